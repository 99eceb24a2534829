"""Stage 2: the plan — every output tensor, which input tensors it reads, with which parameters.

The plan is built from config.json files and safetensors headers only, so a dry run and the real
merge share it: shape mismatches, bad layer ranges and missing parameters surface here, before
any weight is downloaded. Parameter resolution follows mergekit: for each parameter the first
scope that yields a value wins (model > slice > top level > method default); a gradient list is
interpolated at t = i/(n-1) over the n layers of its slice; a list of {filter, value} entries
yields the first entry whose filter is a substring of the tensor name.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from .architecture import Layout, detect_layout, output_config, text_config, vocab_size
from .config import Conditional, MergeConfig, ModelRef, Setting
from .errors import MergeError
from .methods import BasePolicy, MergeMethod, Parameter
from .safetensors_io import OutputTensor
from .sources import ModelSource

if TYPE_CHECKING:
    from .vocabulary import Vocabulary

Scope = dict[str, Setting]


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """The value a setting takes for `tensor_name` at gradient position `t`, or None if no filter matches."""
    if isinstance(setting, tuple) and setting and isinstance(setting[0], Conditional):
        for entry in setting:
            if entry.filter in (None, "*") or entry.filter in tensor_name:
                return evaluate_setting(entry.value, tensor_name, t)
        return None
    if isinstance(setting, tuple):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        position = t * (len(setting) - 1)
        if not numeric:
            return setting[int(position)]
        low = int(position)
        high = min(len(setting) - 1, low + 1)
        frac = position - low
        return (1 - frac) * setting[low] + frac * setting[high]
    return setting


def resolve_parameter(param: Parameter, scopes: Sequence[Scope], tensor_name: str, t: float, where: str) -> Any:
    for scope in scopes:
        if param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t)
            if value is not None:
                return param.type(value) if param.type is not bool and value is not None else value
    if param.required:
        raise MergeError(f"{where}: {param.name} is required for this method and has no value for "
                         f"{tensor_name}; set parameters.{param.name}")
    return param.default


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # output tensor name
    out: OutputTensor
    inputs: tuple[tuple[int, str], ...]  # (index into plan.models, input tensor name)
    base: Optional[int]  # position in `inputs` of the base model's tensor
    params: dict[str, Any]  # resolved: shared values, per-model lists aligned with the non-base inputs
    rows: Optional[int] = None  # vocabulary rows the inputs are aligned to, when they differ
    floating: bool = True  # False: an integer buffer, copied from the first input instead of merged
    computed: bool = False  # no inputs: the value is `plan.computed[name]` (a MoE router, a zero bias)
    whole: bool = False  # merged in one piece even where the method could chunk it (seeded noise per tensor)


@dataclass
class MergePlan:
    config: MergeConfig
    models: list[ModelSource]
    tensors: list[PlannedTensor]
    out_config: dict
    reference: ModelSource  # config.json and generation_config.json come from here
    tokenizer_from: ModelSource
    warnings: list[str] = field(default_factory=list)
    also_reads: tuple[tuple[int, str], ...] = ()  # (model, tensor) read besides the inputs (a MoE's routers)
    computed: dict[str, torch.Tensor] = field(default_factory=dict)  # values of `computed` tensors, once known
    computing: Optional[Future] = None  # the work filling `computed` while the other tensors stream
    vocabulary: Optional["Vocabulary"] = None  # rows aligned by token string (`tokenizer:`), with its tokenizer
    details: tuple[str, ...] = ()  # lines a dry run shows beside the figures (a MoE's experts and routers)
    side_peak_bytes: int = 0  # memory of work before the tensors stream (a MoE's routers)

    @property
    def method(self) -> MergeMethod:
        return self.config.method

    @property
    def output_bytes(self) -> int:
        return sum(t.out.nbytes for t in self.tensors)

    @property
    def parameter_count(self) -> int:
        return sum(t.out.numel for t in self.tensors)

    def needed_files(self) -> dict[int, set[str]]:
        """Per input model, the weight files holding tensors the merge reads."""
        needed: dict[int, set[str]] = {}
        reads = [read for tensor in self.tensors for read in tensor.inputs] + list(self.also_reads)
        for model, name in reads:
            needed.setdefault(model, set()).add(self.models[model].tensors[name].file)
        return needed

    @property
    def download_bytes(self) -> int:
        total = 0
        for model, files in self.needed_files().items():
            source = self.models[model]
            if not source.weights_ref.local:
                total += sum(source.file_sizes.get(f, 0) for f in files)
            if source.adapter_to_fetch is not None:
                total += sum(source.adapter_to_fetch.file_sizes.values())
        return total

    def input_bytes(self, tensor: PlannedTensor) -> int:
        """Bytes of `tensor`'s inputs, as stored."""
        return sum(self.models[m].tensors[n].nbytes for m, n in tensor.inputs)


def torch_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """The torch dtype a config names (`config.DTYPES` values), or None."""
    return getattr(torch, name) if name else None


def _compute_dtype(config: MergeConfig, dtypes: Sequence[torch.dtype]) -> torch.dtype:
    promoted = dtypes[0]
    for dtype in dtypes[1:]:
        promoted = torch.promote_types(promoted, dtype)
    return torch_dtype(config.dtype) or promoted


@dataclass(frozen=True)
class _Slice:
    """One output slice after `models:` is rewritten as a single full-range slice."""

    sources: tuple[tuple[ModelRef, int, Scope], ...]  # (model, first layer, per-model parameters)
    num_layers: int
    base: Optional[ModelRef]
    parameters: Scope
    where: str


def _slices(config: MergeConfig, layouts: dict[ModelRef, Layout]) -> list[_Slice]:
    if config.models is not None:
        entries = [(e.model, 0, e.parameters) for e in config.model_entries()]
        counts = {ref: layouts[ref].num_layers for ref, _, _ in entries}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{ref} has {n}" for ref, n in counts.items())
            raise MergeError(f"models: the models have different layer counts ({detail}); use slices to pick "
                             f"matching layer ranges")
        return [_Slice(tuple(entries), next(iter(counts.values())), config.base_model, {}, "models")]
    result = []
    for i, out in enumerate(config.slices):
        for j, src in enumerate(out.sources):
            available = layouts[src.model].num_layers
            if src.layer_range[1] > available:
                raise MergeError(f"slices[{i}].sources[{j}].layer_range: {list(src.layer_range)} exceeds the "
                                 f"{available} layers of {src.model}; the end must be at most {available}")
        length = out.sources[0].layer_range[1] - out.sources[0].layer_range[0]
        result.append(_Slice(tuple((s.model, s.layer_range[0], s.parameters) for s in out.sources), length,
                             out.base_model or config.base_model, out.parameters, f"slices[{i}]"))
    return result


def build_plan(config: MergeConfig, sources: dict[ModelRef, ModelSource]) -> MergePlan:
    """Plan the merge from configs and headers; raises `MergeError` on anything that would fail later."""
    models = [sources[ref] for ref in config.referenced_models()]
    index_of = {source.ref: i for i, source in enumerate(models)}
    layouts = {source.ref: detect_layout(source) for source in models}
    _check_architectures(models)
    slices = _slices(config, layouts)
    method = config.method
    warnings: list[str] = list(config.warnings) + [note for source in models for note in source.notes]
    vocabulary = None
    if config.tokenizer is not None:
        from .vocabulary import build_vocabulary

        vocabulary = build_vocabulary(config.tokenizer, config.base_model, models)

    reference = sources[config.base_model] if config.base_model else sources[slices[0].sources[0][0]]
    tokenizer_from = reference  # without a `tokenizer`; with one, the vocabulary's own tokenizer is written

    tensors: list[PlannedTensor] = []
    seen_names: set[str] = set()

    def plan_tensor(out_name: str, in_names: list[str], slice_: _Slice, t: float) -> None:
        refs = [ref for ref, _, _ in slice_.sources]
        inputs = []
        for ref, name in zip(refs, in_names):
            resolved = _resolve_input_name(sources[ref], layouts[ref], name)
            if resolved is None:
                if out_name in layouts[ref].post and len(refs) > 1:
                    continue  # an optional head missing from one input, as mergekit skips it
                raise MergeError(f"{slice_.where}: tensor {name} is missing from {ref}; the inputs do not share "
                                 f"one architecture")
            inputs.append((index_of[ref], resolved, ref))
        base_pos = None
        if method.base is not BasePolicy.IGNORED and slice_.base is not None:
            base_pos = next((k for k, (_, _, ref) in enumerate(inputs) if ref == slice_.base), None)
            if base_pos is None and method.base is BasePolicy.REQUIRED:
                raise MergeError(f"{slice_.where}: tensor {out_name} is missing from the base model {slice_.base}")
        params: dict[str, Any] = {}
        shared_scopes = (slice_.parameters, config.parameters)
        for param in method.parameters:
            if not param.per_model:
                params[param.name] = resolve_parameter(param, shared_scopes, out_name, t, slice_.where)
        per_model_inputs = [k for k in range(len(inputs)) if k != base_pos]
        for param in method.parameters:
            if param.per_model:
                values = []
                for k in per_model_inputs:
                    _, in_name, ref = inputs[k]
                    own = next(scope for r, _, scope in slice_.sources if r == ref)
                    values.append(resolve_parameter(param, (own, slice_.parameters, config.parameters), in_name, t,
                                                    f"{slice_.where} ({ref})"))
                params[param.name] = values
        problem = method.check(params) if method.check is not None else None
        if problem:
            raise MergeError(f"{slice_.where}: {problem}")
        headers = [sources[ref].tensors[name] for _, name, ref in inputs]
        shapes = {h.shape for h in headers}
        rows = None
        if vocabulary is not None and all(_is_vocabulary(sources[ref], name) for _, name, ref in inputs):
            if len({h.shape[1:] for h in headers}) > 1:
                raise MergeError(f"{out_name}: shapes differ between inputs beyond the vocabulary; these models "
                                 f"cannot be merged")
            rows = vocabulary.rows
        elif len(shapes) > 1:
            rows = _common_rows(out_name, headers, [ref for _, _, ref in inputs], warnings)
        shape = headers[0].shape if rows is None else (rows, *headers[0].shape[1:])
        floating = all(h.dtype.is_floating_point for h in headers)
        out_dtype = (torch_dtype(config.out_dtype) or _compute_dtype(config, [h.dtype for h in headers])) if floating \
            else headers[0].dtype
        if out_name in seen_names:
            raise MergeError(f"{slice_.where}: output tensor {out_name} is produced twice")
        seen_names.add(out_name)
        tensors.append(PlannedTensor(out_name, OutputTensor(out_name, out_dtype, shape),
                                     tuple((m, n) for m, n, _ in inputs), base_pos, params, rows, floating))

    first, last = slices[0], slices[-1]
    ref_layout = layouts[first.sources[0][0]]
    for name in ref_layout.pre:
        plan_tensor(name, [name] * len(first.sources), first, 0.0)
    out_layer = 0
    layer_sources: list[tuple[dict, int]] = []
    for slice_ in slices:
        for offset in range(slice_.num_layers):
            t = offset / (slice_.num_layers - 1) if slice_.num_layers > 1 else 1.0
            lead_ref, lead_start, _ = slice_.sources[0]
            lead_layout = layouts[lead_ref]
            for suffix in lead_layout.layer_suffixes[lead_start + offset]:
                in_names = [layouts[ref].layer_tensor(start + offset, suffix) for ref, start, _ in slice_.sources]
                plan_tensor(ref_layout.layer_tensor(out_layer, suffix), in_names, slice_, t)
            layer_sources.append((sources[lead_ref].config, lead_start + offset))
            out_layer += 1
    for name in layouts[last.sources[0][0]].post:
        plan_tensor(name, [name] * len(last.sources), last, 0.0)

    out_cfg = output_config(reference.config, layer_sources, layouts[reference.ref].num_layers)
    vocab_rows = {t.rows for t in tensors if t.rows is not None}
    if vocabulary is not None:
        text_config(out_cfg)["vocab_size"] = vocabulary.rows
    elif vocab_rows:
        text_config(out_cfg)["vocab_size"] = max(vocab_rows)
    details = tuple(vocabulary.summary(config.base_model or models[0].ref)) if vocabulary is not None else ()
    return MergePlan(config, models, tensors, out_cfg, reference, tokenizer_from, warnings, details=details,
                     vocabulary=vocabulary)


def _is_vocabulary(source: ModelSource, name: str) -> bool:
    """An embedding or LM head: a 2-D tensor outside the layers with one row per token."""
    header = source.tensors[name]
    return len(header.shape) == 2 and header.shape[0] == vocab_size(source.config) and ".layers." not in name


def _resolve_input_name(source: ModelSource, layout: Layout, name: str) -> Optional[str]:
    if name in source.tensors:
        return name
    # Tied embeddings: a model without an LM head uses its input embedding (mergekit's tied_names).
    if name in ("lm_head.weight",) or name.endswith(".lm_head.weight"):
        tie = text_config(source.config).get("tie_word_embeddings", source.config.get("tie_word_embeddings", True))
        if tie:
            return next((p for p in layout.pre if p.endswith("embed_tokens.weight") or p.endswith("wte.weight")),
                        None)
    return None


def _common_rows(name: str, headers, refs, warnings: list[str]) -> int:
    """Rows a vocabulary tensor is truncated to when inputs disagree on vocabulary size (no `tokenizer`)."""
    row_counts = [h.shape[0] for h in headers]
    if len({h.shape[1:] for h in headers}) > 1 or not headers[0].shape:
        detail = ", ".join(f"{ref} {list(h.shape)}" for ref, h in zip(refs, headers))
        raise MergeError(f"{name}: shapes differ between inputs ({detail}); these models cannot be merged")
    rows = min(row_counts)
    warnings.append(f"{name}: vocabulary sizes differ {sorted(set(row_counts))}; truncated to the common {rows} rows "
                    f"(set tokenizer_source: union to keep every input's tokens, aligned by token)")
    return rows


def _check_architectures(models: list[ModelSource]) -> None:
    seen: dict[str, ModelSource] = {}
    for source in models:
        arch = ",".join(source.config.get("architectures") or [source.config.get("model_type", "?")])
        seen.setdefault(arch, source)
    if len(seen) > 1:
        detail = ", ".join(f"{src.label} is {arch}" for arch, src in seen.items())
        raise MergeError(f"models: inputs mix architectures ({detail}); merge models of one architecture")
