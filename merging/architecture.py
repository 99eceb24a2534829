"""Layer structure read from the checkpoint itself, for any decoder-style architecture.

No per-architecture tables: layers are the tensors named ``<prefix>.<i>.<rest>`` (``model.layers.3.``
for Llama/Mistral/Qwen2/Gemma/Phi-3, ``transformer.h.3.`` for GPT-2 style), and the layer count
is the config key that holds it. Everything else is a non-layer tensor: embeddings come before
the layers ("pre"), final norms and the LM head after ("post").
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from .errors import MergeError
from .sources import ModelSource

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_LAYER_NAME = re.compile(r"^(?P<prefix>(?:[\w.]*?\.)?(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE_NAME = re.compile(r"(embed|(^|\.)w[tp]e\.)")


@dataclass(frozen=True)
class Layout:
    prefix: str  # "model.layers"
    num_layers: int
    layer_suffixes: dict[int, tuple[str, ...]]  # layer index -> tensor names after "<prefix>.<i>."
    pre: tuple[str, ...]  # non-layer tensors that come before the layers (embeddings)
    post: tuple[str, ...]  # non-layer tensors after the layers (final norm, LM head)

    def layer_tensor(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"


def text_config(config: dict) -> dict:
    """The part of config.json that describes the language model (multimodal configs nest it)."""
    nested = config.get("text_config")
    if isinstance(nested, dict) and not any(k in config for k in LAYER_COUNT_KEYS):
        return nested
    return config


def vocab_size(config: dict) -> Optional[int]:
    """Embedding rows the config declares (`vocab_size`, nested for multimodal configs)."""
    size = text_config(config).get("vocab_size", config.get("vocab_size"))
    return size if isinstance(size, int) else None


def layer_count_key(config: dict) -> Optional[str]:
    section = text_config(config)
    return next((k for k in LAYER_COUNT_KEYS if isinstance(section.get(k), int)), None)


def detect_layout(source: ModelSource) -> Layout:
    by_prefix: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    others: list[str] = []
    for name in source.tensors:
        match = _LAYER_NAME.match(name)
        if match:
            by_prefix[match["prefix"]][int(match["index"])].append(match["rest"])
        else:
            others.append(name)
    key = layer_count_key(source.config)
    expected = text_config(source.config).get(key) if key else None
    if not by_prefix:
        raise MergeError(f"{source.label}: found no numbered layers (like 'model.layers.0.') in its tensors")
    if len(by_prefix) == 1:
        prefix = next(iter(by_prefix))
    else:  # e.g. a vision tower beside the decoder: pick the stack the config counts
        matching = [p for p, layers in by_prefix.items() if len(layers) == expected]
        if len(matching) != 1:
            raise MergeError(f"{source.label}: several layer stacks ({', '.join(sorted(by_prefix))}); "
                             f"multi-module models are not supported yet")
        prefix = matching[0]
        others += [f"{p}.{i}.{rest}" for p, layers in by_prefix.items() if p != prefix
                   for i, rests in layers.items() for rest in rests]
    layers = by_prefix[prefix]
    count = max(layers) + 1
    if sorted(layers) != list(range(count)):
        raise MergeError(f"{source.label}: layers of {prefix} are not numbered 0..{count - 1}")
    if expected is not None and expected != count:
        raise MergeError(f"{source.label}: config.json says {key}={expected} but the weights have {count} layers")
    pre = tuple(n for n in others if _PRE_NAME.search(n))
    post = tuple(n for n in others if not _PRE_NAME.search(n))
    return Layout(prefix, count, {i: tuple(rests) for i, rests in layers.items()}, pre, post)


def per_layer_keys(config: dict, num_layers: int) -> list[str]:
    """Config entries that hold one value per layer (``layer_types`` of Qwen2/Gemma2, ...)."""
    section = text_config(config)
    return [k for k, v in section.items()
            if isinstance(v, list) and len(v) == num_layers and "layer" in k]


def output_config(reference: dict, layer_sources: list[tuple[dict, int]], source_layers: int) -> dict:
    """The merged model's config.json: the reference config with layer count and per-layer lists rebuilt.

    `layer_sources[i]` is (config of the model output layer i comes from, its layer index there).
    """
    import copy

    config = copy.deepcopy(reference)
    section = text_config(config)
    key = layer_count_key(reference)
    if key is None:
        raise MergeError("config.json of the reference model has no layer count "
                         f"({' / '.join(LAYER_COUNT_KEYS)})")
    keys = per_layer_keys(reference, source_layers)
    section[key] = len(layer_sources)
    for k in keys:
        rebuilt = []
        for source_config, index in layer_sources:
            values = text_config(source_config).get(k)
            if not isinstance(values, list) or index >= len(values):
                raise MergeError(f"config.json: '{k}' is per-layer in the reference model but missing or short "
                                 f"in another input; merge models with the same layer structure")
            rebuilt.append(values[index])
        section[k] = rebuilt
    return config
