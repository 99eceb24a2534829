"""Vocabularies that differ: `tokenizer_source: union` and the `tokenizer:` block, as mergekit 0.1.5.

The output tokenizer is the base's, the union of every input's (`union`), or one model's; `tokens:`
entries add tokens and say where their rows come from. Each input's embedding and LM-head rows
are then aligned **by token string**: row `i` of the output is the input's row for the token the
output tokenizer gives id `i`, wherever that input keeps it. A token an input lacks takes
mergekit's default: its `tokens:` source if given, else the row of the one input that has it, else
the base's row, else the mean of the inputs that have it (zeros when none does). `force` uses the
configured source even for inputs that have the token. Rows added by `pad_to_multiple_of` take
the mean of the real rows.

transformers is imported here only, for the tokenizers (a config without these keys never loads it).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .architecture import vocab_size
from .errors import MergeError
from .refs import ModelRef, shown
from .sources import ModelSource
from .tokens import TokenizerSpec, TokenSetting, TokenSource


@dataclass
class Vocabulary:
    """The output vocabulary and, per input model, where each output token sits in it."""

    tokenizer: object  # a transformers tokenizer, saved with the merge
    tokens: dict[str, int]  # output token -> id
    rows: int  # output rows (the vocabulary, padded)
    permutations: dict[ModelRef, torch.Tensor]  # output id -> the input's id, or -1
    original: dict[ModelRef, dict[str, int]]  # each input's own vocabulary
    spec: TokenizerSpec
    base: Optional[ModelRef]

    def summary(self, base: ModelRef) -> list[str]:
        """What the dry run shows: size, tokens added to the base's vocabulary, tokens moved."""
        base_vocab = self.original.get(base, {})
        added = [t for t in self.tokens if t not in base_vocab]
        lines = [f"output vocabulary: {len(self.tokens)} tokens" + (f", {self.rows} rows" if self.rows !=
                                                                      len(self.tokens) else "")]
        if added:
            lines.append(f"tokens added to the base's vocabulary: {len(added)} ({', '.join(map(repr, added[:6]))}"
                         f"{', ...' if len(added) > 6 else ''})")
        for ref, vocab in self.original.items():
            moved = [t for t, i in self.tokens.items() if vocab.get(t, i) != i]
            if moved:
                lines.append(f"tokens at other ids in {ref}: {len(moved)} ({', '.join(map(repr, moved[:6]))}"
                             f"{', ...' if len(moved) > 6 else ''}), moved by token")
        return lines

    def align(self, tensors: dict[ModelRef, torch.Tensor]) -> dict[ModelRef, torch.Tensor]:
        """Each input's vocabulary tensor with its rows in output token order (mergekit's PermutedVocabulary)."""
        models = list(tensors)
        shape = next(iter(tensors.values())).shape[1:]
        dtype = tensors[models[0]].dtype
        for tensor in tensors.values():
            dtype = torch.promote_types(dtype, tensor.dtype)
        present = {m: self.permutations[m] >= 0 for m in models}
        settings = dict(self.spec.tokens)
        averaged = self._assign_sources(models, settings)
        defaults: dict[int, torch.Tensor] = {}
        for token, token_id in self.tokens.items():
            setting = settings.get(token)
            if not (setting and setting.force) and all(bool(present[m][token_id]) for m in models):
                continue
            if token in averaged:
                donors = [tensors[m][int(self.permutations[m][token_id])] for m in models if present[m][token_id]]
                row = torch.zeros(shape, dtype=dtype)
                for donor in donors:
                    row = row + donor
                defaults[token_id] = row / len(donors)
            elif setting is not None:
                defaults[token_id] = self._configured_row(tensors, token, token_id, setting, shape, dtype)
        forced = torch.tensor([bool(settings.get(t) and settings[t].force) for t in self.tokens])
        result = {}
        for model in models:
            aligned = torch.zeros((self.rows, *shape), dtype=dtype)
            order = self.permutations[model]
            use = (order >= 0) & ~forced
            ids = torch.nonzero(use).flatten()
            aligned[ids] = tensors[model][order[ids]].to(dtype)
            for token_id, row in defaults.items():
                if not use[token_id]:
                    aligned[token_id] = row
            if self.rows > len(self.tokens):
                aligned[len(self.tokens):] = aligned[:len(self.tokens)].mean(dim=0)
            result[model] = aligned
        return result

    def _assign_sources(self, models: list[ModelRef], settings: dict[str, TokenSetting]) -> set[str]:
        """Fill in `settings` for tokens some inputs lack; returns the tokens to average."""
        averaged = set()
        for token, token_id in self.tokens.items():
            if token in settings:
                continue
            has = [bool(self.permutations[m][token_id] >= 0) for m in models]
            if sum(has) == 1:
                settings[token] = TokenSetting(TokenSource(models[has.index(True)]))
            elif sum(has) == 0:
                settings[token] = TokenSetting(TokenSource(None))
            elif self.base in models and self.permutations[self.base][token_id] >= 0:
                settings[token] = TokenSetting(TokenSource(self.base))
            else:
                averaged.add(token)
        return averaged

    def _configured_row(self, tensors, token: str, token_id: int, setting: TokenSetting, shape, dtype):
        source = setting.source
        if source is None or source.model is None:
            return torch.zeros(shape, dtype=dtype)
        if source.model not in tensors:
            raise MergeError(f"tokenizer.tokens.{token}: its row comes from {source.model}, which does not hold "
                             f"this vocabulary tensor")
        if source.token is not None:
            index = self.original[source.model][source.token]
        elif source.token_id is not None:
            index = source.token_id
        else:
            index = int(self.permutations[source.model][token_id])
        if not 0 <= index < tensors[source.model].shape[0]:
            raise MergeError(f"tokenizer.tokens.{token}: {source.model} has no row {index} for it")
        return tensors[source.model][index].to(dtype)


def _vocab_size(source: ModelSource, tokenizer) -> int:
    return vocab_size(source.config) or len(tokenizer.get_vocab())


def _load(source: ModelSource):
    from transformers import AutoTokenizer

    if source.local_dir is None or not any((source.local_dir / n).is_file() for n in
                                           ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source.local_dir), use_fast=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the same problem for the user
        raise MergeError(f"{source.label}: its tokenizer does not load ({type(exc).__name__}: {str(exc)[:120]}); "
                         f"vocabularies are aligned by token, so every input needs one") from None


def _stripped(source: ModelSource, tokenizer):
    """The tokenizer without tokens past the model's embedding rows (mergekit's get_stripped_tokenizer)."""
    import tokenizers

    size = _vocab_size(source, tokenizer)
    unused = [t for t, i in tokenizer.get_vocab().items() if i >= size]
    if not unused:
        return tokenizer
    data = json.loads(tokenizer._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise MergeError(f"{source.label}: its tokenizer has tokens past the {size} embedding rows and is "
                         f"{data['model']['type']}, not BPE; only BPE tokenizers can be trimmed")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for token in unused:
        data["model"]["vocab"].pop(token, None)
    drop = set(unused)
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not drop & set(m.split(" ") if isinstance(m, str) else m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _union(base_tokenizer, tokenizers: dict[ModelRef, object], sources: dict[ModelRef, ModelSource]):
    """The base's tokenizer with every input's other tokens added (mergekit's build_union_tokenizer)."""
    from transformers import AutoTokenizer

    vocab_out: dict[str, int] = {}
    added: dict = {}
    for ref, tokenizer in tokenizers.items():
        size = _vocab_size(sources[ref], tokenizer)
        special = tokenizer.added_tokens_decoder
        special_text = {info.content for info in special.values()}
        for token, index in tokenizer.get_vocab().items():
            if index < size and token not in special_text:
                vocab_out.setdefault(token, len(vocab_out))
        for index, info in special.items():
            if index < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:  # a copy, so the base's own tokenizer stays as it is
        base_tokenizer.save_pretrained(folder)
        result = AutoTokenizer.from_pretrained(folder, use_fast=True)
    base_vocab = base_tokenizer.get_vocab()
    for token in vocab_out:
        if token not in added and token not in base_vocab:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


def build_vocabulary(spec: TokenizerSpec, base: Optional[ModelRef], models: list[ModelSource]) -> Vocabulary:
    """The output tokenizer and each input's permutation into it, from the inputs' tokenizer files."""
    sources = {m.ref: m for m in models}
    base = base or models[0].ref
    base_tokenizer = _load(sources[base])
    if base_tokenizer is None:
        raise MergeError(f"tokenizer: the base model {base} has no tokenizer files; vocabularies are aligned by "
                         f"token, so it needs one")
    tokenizers = {base: _stripped(sources[base], base_tokenizer)}
    for source in models:
        if source.ref not in tokenizers:
            loaded = _load(source)
            if loaded is not None:  # as mergekit: an input without a tokenizer shares the base's
                tokenizers[source.ref] = loaded
    vocabs = {ref: tokenizer.get_vocab() for ref, tokenizer in tokenizers.items()}  # before any token is added
    if isinstance(spec.source, ModelRef):
        output = _load(sources[spec.source])
        if output is None:
            raise MergeError(f"tokenizer.source: {spec.source} has no tokenizer files")
    elif spec.source == "base":
        output = tokenizers[base]
    else:
        output = _union(tokenizers[base], tokenizers, sources)
    existing = set(output.get_vocab())
    for token in spec.tokens:
        if token not in existing:
            output.add_tokens(token)
            existing.add(token)
    tokens = dict(sorted(output.get_vocab().items(), key=lambda item: item[1]))
    rows = max(len(tokens), max(tokens.values(), default=-1) + 1)  # every id a row, gaps included
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of

    permutations, original = {}, {}
    for source in models:
        vocab = vocabs.get(source.ref, vocabs[base])
        original[source.ref] = vocab
        size = _vocab_size(source, tokenizers.get(source.ref) or tokenizers[base])
        order = torch.full((len(tokens),), -1, dtype=torch.long)
        for token, new_id in tokens.items():
            old = vocab.get(token)
            if old is not None and old < size:
                order[new_id] = old
        permutations[source.ref] = order
    vocabulary = Vocabulary(output, tokens, rows, permutations, original, spec, base)
    _check_token_sources(vocabulary)
    return vocabulary


def _check_token_sources(vocabulary: Vocabulary) -> None:
    for token, setting in vocabulary.spec.tokens.items():
        source = setting.source
        if source is None or source.model is None:
            continue
        vocab = vocabulary.original.get(source.model, {})
        if source.token is not None and source.token not in vocab:
            raise MergeError(f"tokenizer.tokens.{token}.source.token: {source.model}'s tokenizer has no token "
                             f"{shown(source.token, 40)}")
        if source.token is None and source.token_id is None and token not in vocab:
            raise MergeError(f"tokenizer.tokens.{token}.source: {source.model}'s tokenizer has no token "
                             f"{shown(token, 40)}; name a model that has it, or a model_token or zero source")


def save_tokenizer(vocabulary: Vocabulary, directory: Path) -> list[str]:
    """Write the output tokenizer's files; returns their names."""
    before = set(p.name for p in directory.iterdir())
    vocabulary.tokenizer.save_pretrained(str(directory))
    return sorted(set(p.name for p in directory.iterdir()) - before)
