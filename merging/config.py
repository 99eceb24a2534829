"""Stage 1: parse and validate a mergekit-compatible YAML config.

Everything here is checked from the text alone, before any file is read or downloaded. Checks
that need the models (layer ranges, shapes, architectures) happen in `plan`. Every error is a
`MergeError` whose one line names the field (``models[1].parameters.density``) and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Optional, Sequence, Union

import yaml

from . import untrusted_yaml
from .chat_templates import BUILTIN as BUILTIN_CHAT_TEMPLATES
from .errors import MergeError, check_keys, did_you_mean
from .methods import REGISTRY, BasePolicy, MergeMethod, Parameter
from .refs import ModelRef, parse_model_ref, shown
from .tokens import RefParser, TokenizerSpec, check_token_models, parse_tokenizer

if TYPE_CHECKING:
    from .moe import MoEConfig

Scalar = Union[bool, int, float, str]
# A parameter setting as written: a scalar, a gradient (list of scalars), or filtered entries.
Setting = Union[Scalar, tuple[Scalar, ...], tuple["Conditional", ...]]

# dtype names a config may use -> the torch dtype's name (torch itself loads only to merge)
DTYPES: dict[str, str] = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64",
}

_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "modules", "name", "description")
_MODEL_KEYS = ("model", "parameters")
_SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
_SOURCE_KEYS = ("model", "layer_range", "parameters")
FLOAT32_MAX = 3.4028234663852886e38  # merges compute in float32: a larger parameter overflows


@dataclass(frozen=True)
class Conditional:
    filter: Optional[str]
    value: Union[Scalar, tuple[Scalar, ...]]


@dataclass(frozen=True)
class ModelEntry:
    model: ModelRef
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base_model: Optional[ModelRef] = None
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    method: MergeMethod
    base_model: Optional[ModelRef]
    models: Optional[tuple[ModelEntry, ...]]
    slices: Optional[tuple[OutputSlice, ...]]
    parameters: dict[str, Setting]
    dtype: Optional[str]  # a torch dtype's name (`DTYPES`)
    out_dtype: Optional[str]
    chat_template: Optional[str]
    text: str  # the YAML as the user wrote it, embedded in the model card
    warnings: tuple[str, ...] = ()  # legitimate but unusual values, for the log and the card
    mapping: dict = field(default_factory=dict, compare=False, repr=False)  # the YAML as read, validated
    tokenizer: Optional[TokenizerSpec] = None  # rows aligned by token string (`vocabulary`)

    config_file: ClassVar[str] = "mergekit_config.yml"  # where the output keeps the config as written

    def model_entries(self) -> tuple[ModelEntry, ...]:
        """A `models:` merge's entries, with the base added when the list leaves it out (as mergekit does)."""
        entries = self.models or ()
        if self.base_model and self.base_model not in [e.model for e in entries]:
            entries += (ModelEntry(self.base_model),)
        return entries

    def referenced_models(self) -> list[ModelRef]:
        """Every model the merge reads, base first, each once, in config order."""
        seen: dict[ModelRef, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for entry in self.models or ():
            seen[entry.model] = None
        for out in self.slices or ():
            if out.base_model:
                seen[out.base_model] = None
            for source in out.sources:
                seen[source.model] = None
        if self.tokenizer is not None and isinstance(self.tokenizer.source, ModelRef):
            seen[self.tokenizer.source] = None
        return list(seen)


def _check_scalar(value: Any, param: Parameter, where: str) -> Scalar:
    if value is None and param.optional:
        return value
    if param.type is bool:
        if isinstance(value, bool):
            return value
        raise MergeError(f"{where}: {param.name} must be true or false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                return _check_scalar(float(value), param, where)
            except ValueError:
                pass
        kind = "an integer" if param.type is int else "a number"
        raise MergeError(f"{where}: {param.name} must be {kind}, got {shown(value, 40)}")
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise MergeError(f"{where}: {param.name} is {value!r}, out of range: merges compute in float32, whose "
                         f"largest value is 3.4e38")
    if param.type is int and not float(value).is_integer():
        raise MergeError(f"{where}: {param.name} must be an integer, got {value!r}")
    if param.valid is not None and value not in param.valid:
        raise MergeError(f"{where}: {param.name} must lie in {param.valid}, got {value!r}")
    return param.type(value)


def _parse_setting(raw: Any, param: Parameter, where: str, allow_filters: bool = True) -> Setting:
    if isinstance(raw, dict):
        if allow_filters and set(raw) <= {"filter", "value"} and "value" in raw:
            return (_parse_conditional(raw, param, where),)
        raise MergeError(f"{where}: expected a value, a list of values, or entries with 'filter' and 'value'")
    if isinstance(raw, list):
        if not raw:
            raise MergeError(f"{where}: an empty list is not a value; give a number or a list of numbers")
        if all(isinstance(item, dict) for item in raw):
            if not allow_filters:
                raise MergeError(f"{where}: filtered entries cannot nest inside a filtered entry")
            return tuple(_parse_conditional(item, param, f"{where}[{i}]") for i, item in enumerate(raw))
        if any(isinstance(item, (dict, list)) for item in raw):
            raise MergeError(f"{where}: a gradient is a flat list of numbers; do not mix lists or filters into it")
        return tuple(_check_scalar(item, param, f"{where}[{i}]") for i, item in enumerate(raw))
    return _check_scalar(raw, param, where)


def _parse_conditional(raw: Any, param: Parameter, where: str) -> Conditional:
    if not isinstance(raw, dict):
        raise MergeError(f"{where}: expected an entry with 'filter' and 'value'")
    check_keys(raw, ("filter", "value"), f"{where}.")
    if "value" not in raw:
        raise MergeError(f"{where}: a filtered entry needs a 'value'")
    filt = raw.get("filter")
    if filt is not None and not isinstance(filt, str):
        raise MergeError(f"{where}.filter: must be a string such as 'self_attn' or 'mlp'")
    value = _parse_setting(raw["value"], param, f"{where}.value", allow_filters=False)
    return Conditional(filt, value)


def _parse_parameters(raw: Any, method: MergeMethod, where: str) -> dict[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MergeError(f"{where}: must be a mapping of parameter names to values")
    names = tuple(method.param_index)
    result = {}
    for name, value in raw.items():
        param = method.param_index.get(name)
        if param is None:
            accepted = ", ".join(names) if names else "none"
            raise MergeError(f"{where}.{name}: {method.name} has no parameter {name!r}"
                             f"{did_you_mean(str(name), names)}; it accepts: {accepted}")
        result[name] = _parse_setting(value, param, f"{where}.{name}")
    return result


def _parse_dtype(raw: Any, where: str) -> Optional[str]:
    if raw is None:
        return None
    dtype = DTYPES.get(str(raw).lower())
    if dtype is None:
        raise MergeError(f"{where}: unknown dtype {raw!r}{did_you_mean(str(raw), DTYPES)}; "
                         f"use bfloat16, float16 or float32")
    return dtype


def _parse_layer_range(raw: Any, where: str) -> tuple[int, int]:
    if (not isinstance(raw, list) or len(raw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)):
        raise MergeError(f"{where}: must be [start, end] with whole numbers, e.g. [0, 16]")
    start, end = raw
    if start < 0 or end <= start:
        raise MergeError(f"{where}: [{start}, {end}] is empty or negative; end is exclusive and must exceed start")
    return start, end


def parse_config(text: str, *, base_dir: Optional[Path] = None,
                 local_roots: Optional[Sequence[Path]] = None) -> "MergeConfig | MoEConfig":
    """Parse and validate a YAML merge config, or a mergekit-moe config (it has `experts:`).
    Raises `MergeError` with a one-line message.

    Relative local paths resolve against `base_dir`; with `local_roots` (a shared deployment) only
    directories under those roots may be named (`parse_model_ref`)."""
    try:
        raw = untrusted_yaml.load(text)
    except untrusted_yaml.UnsafeYAML as exc:
        raise MergeError(f"config: refused: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise MergeError(f"config: the YAML does not parse{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise MergeError("config: expected a YAML mapping with merge_method and models or slices")
    if "experts" in raw and "merge_method" not in raw:  # a mergekit-moe config
        from .moe import parse_moe_config

        return parse_moe_config(raw, text, base_dir=base_dir, local_roots=local_roots)
    check_keys(raw, _TOP_KEYS, "")

    method_name = raw.get("merge_method")
    if not isinstance(method_name, str):
        raise MergeError(f"merge_method: required; one of {', '.join(sorted(REGISTRY))}")
    method = REGISTRY.get(method_name)
    if method is None:
        raise MergeError(f"merge_method: unknown method {method_name!r}{did_you_mean(method_name, REGISTRY)}; "
                         f"supported: {', '.join(sorted(REGISTRY))}")
    if raw.get("modules") is not None:
        raise MergeError("modules: multi-module configs are not supported yet; use models or slices")
    if raw.get("tokenizer") is not None and raw.get("tokenizer_source") is not None:
        raise MergeError("tokenizer_source: give either tokenizer_source or the tokenizer block, not both")

    def ref(value: Any, where: str) -> ModelRef:
        return parse_model_ref(value, where, base_dir, local_roots)

    base_model = ref(raw["base_model"], "base_model") if raw.get("base_model") else None
    has_models, has_slices = raw.get("models") is not None, raw.get("slices") is not None
    if has_models == has_slices:
        raise MergeError("models/slices: give exactly one of 'models' (whole models) or 'slices' (layer ranges)")

    models = slices = None
    if has_models:
        models = _parse_models(raw["models"], method, ref)
    else:
        slices = _parse_slices(raw["slices"], method, ref)

    parameters = _parse_parameters(raw.get("parameters"), method, "parameters")
    tokenizer = _parse_tokenizer_source(raw.get("tokenizer_source"), base_model, ref)
    if raw.get("tokenizer") is not None:
        tokenizer = parse_tokenizer(raw["tokenizer"], ref)
    chat_template = _parse_chat_template(raw.get("chat_template"))

    config = MergeConfig(
        method=method, base_model=base_model, models=models, slices=slices, parameters=parameters,
        dtype=_parse_dtype(raw.get("dtype"), "dtype"), out_dtype=_parse_dtype(raw.get("out_dtype"), "out_dtype"),
        chat_template=chat_template, text=text, tokenizer=tokenizer,
    )
    _check_input_counts(config)
    if tokenizer is not None:
        check_token_models(tokenizer, config.referenced_models())
    return dataclasses.replace(config, warnings=tuple(_unusual_values(config)), mapping=raw)


def _scopes(config: MergeConfig) -> Iterator[tuple[str, dict[str, Setting]]]:
    """(where, parameters) of every scope a config sets parameters in."""
    yield "parameters", config.parameters
    for i, entry in enumerate(config.models or ()):
        yield f"models[{i}].parameters", entry.parameters
    for i, out in enumerate(config.slices or ()):
        yield f"slices[{i}].parameters", out.parameters
        for j, source in enumerate(out.sources):
            yield f"slices[{i}].sources[{j}].parameters", source.parameters


def _numbers(setting: Setting) -> Iterator[float]:
    if isinstance(setting, tuple):
        for item in setting:
            yield from _numbers(item.value if isinstance(item, Conditional) else item)
    elif isinstance(setting, (int, float)) and not isinstance(setting, bool):
        yield setting


def _unusual_values(config: MergeConfig) -> Iterator[str]:
    """Warnings for values that merge but seldom mean what was intended (negative weights, a huge lambda)."""
    for where, scope in _scopes(config):
        for name, setting in scope.items():
            usual = config.method.param_index[name].usual
            odd = [v for v in _numbers(setting) if usual is not None and v not in usual]
            if odd:
                yield (f"{where}.{name}: {odd[0]:g} is outside the usual range {usual}; merged as written, "
                       f"check that it is meant")


def _non_empty_list(raw: Any, where: str, of: str) -> list:
    if not isinstance(raw, list) or not raw:
        raise MergeError(f"{where}: must be a non-empty list of {of}")
    return raw


def _parse_models(raw: Any, method: MergeMethod, ref: RefParser) -> tuple[ModelEntry, ...]:
    entries = []
    for i, item in enumerate(_non_empty_list(raw, "models", "entries with a 'model' key")):
        where = f"models[{i}]"
        if isinstance(item, str):  # shorthand some configs use: `- org/model`
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise MergeError(f"{where}: each entry needs a 'model' key")
        check_keys(item, _MODEL_KEYS, f"{where}.")
        params = _parse_parameters(item.get("parameters"), method, f"{where}.parameters")
        entries.append(ModelEntry(ref(item["model"], f"{where}.model"), params))
    seen = set()
    for i, entry in enumerate(entries):
        if entry.model in seen:
            raise MergeError(f"models[{i}].model: {entry.model} is listed twice; merge each model once")
        seen.add(entry.model)
    return tuple(entries)


def _parse_slices(raw: Any, method: MergeMethod, ref: RefParser) -> tuple[OutputSlice, ...]:
    result = []
    for i, item in enumerate(_non_empty_list(raw, "slices", "entries with 'sources'")):
        where = f"slices[{i}]"
        if not isinstance(item, dict):
            raise MergeError(f"{where}: each slice is a mapping with 'sources'")
        check_keys(item, _SLICE_KEYS, f"{where}.")
        if "residual_weight" in item:
            raise MergeError(f"{where}.residual_weight: not supported (mergekit ignores it too); remove it")
        sources = []
        listed = _non_empty_list(item.get("sources"), f"{where}.sources", "{model, layer_range} entries")
        for j, src in enumerate(listed):
            src_where = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src:
                raise MergeError(f"{src_where}: each source needs 'model' and 'layer_range'")
            check_keys(src, _SOURCE_KEYS, f"{src_where}.")
            if "layer_range" not in src:
                raise MergeError(f"{src_where}.layer_range: required, e.g. [0, 32] (end exclusive)")
            sources.append(SliceSource(
                ref(src["model"], f"{src_where}.model"),
                _parse_layer_range(src["layer_range"], f"{src_where}.layer_range"),
                _parse_parameters(src.get("parameters"), method, f"{src_where}.parameters"),
            ))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{list(s.layer_range)}" for s in sources)
            raise MergeError(f"{where}.sources: every source of a slice needs the same number of layers; got {ranges}")
        slice_base = ref(item["base_model"], f"{where}.base_model") if item.get("base_model") else None
        result.append(OutputSlice(tuple(sources), slice_base,
                                  _parse_parameters(item.get("parameters"), method, f"{where}.parameters")))
    return tuple(result)


def _parse_tokenizer_source(raw: Any, base: Optional[ModelRef], ref: RefParser) -> Optional[TokenizerSpec]:
    """`tokenizer_source: union | base | <model>`: the `tokenizer:` block's source alone, as in mergekit."""
    if raw is None:
        return None
    if raw == "base" and base is None:
        raise MergeError("tokenizer_source: 'base' needs a base_model; set base_model or name a model")
    return TokenizerSpec(raw if raw in ("union", "base") else ref(raw, "tokenizer_source"))


def _parse_chat_template(raw: Any) -> Optional[str]:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise MergeError(f"chat_template: expected 'auto', one of {', '.join(BUILTIN_CHAT_TEMPLATES)}, "
                         f"or a Jinja template")
    if raw in BUILTIN_CHAT_TEMPLATES or raw == "auto":
        return raw
    if "{" not in raw:
        raise MergeError(f"chat_template: unknown template {raw!r}{did_you_mean(raw, BUILTIN_CHAT_TEMPLATES)}; "
                         f"use auto, {', '.join(BUILTIN_CHAT_TEMPLATES)} or a literal Jinja template")
    import jinja2

    try:
        jinja2.Environment().parse(raw)
    except jinja2.TemplateSyntaxError as exc:
        raise MergeError(f"chat_template: the Jinja template does not compile (line {exc.lineno}: "
                         f"{exc.message})") from None
    return raw


def _check_input_counts(config: MergeConfig) -> None:
    """Base policy and input counts, per output slice, as mergekit's input contracts."""
    method = config.method
    groups: list[tuple[str, list[ModelRef], Optional[ModelRef]]] = []
    if config.models is not None:
        groups.append(("models", [e.model for e in config.model_entries()], config.base_model))
    else:
        for i, out in enumerate(config.slices):
            groups.append((f"slices[{i}].sources", [s.model for s in out.sources], out.base_model or config.base_model))

    for where, refs, base in groups:
        if len(set(refs)) != len(refs):
            raise MergeError(f"{where}: a model appears twice in one merge; list each model once")
        if method.base is BasePolicy.REQUIRED:
            if base is None:
                raise MergeError(f"base_model: {method.name} needs a base_model; add base_model: <the model the "
                                 f"others were fine-tuned from>")
            if base not in refs:
                raise MergeError(f"{where}: the base model {base} must be one of the sources of each slice")
        counted = len(refs) - (1 if base in refs and method.base is not BasePolicy.IGNORED else 0)
        limit = method.max_models if method.max_models is not None else method.min_models
        noun = "model" if limit == 1 else "models"
        what = f"{noun} besides the base" if method.base is not BasePolicy.IGNORED else noun
        if counted < method.min_models or (method.max_models is not None and counted > method.max_models):
            if method.max_models is None:
                expected = f"at least {method.min_models}"
            elif method.max_models == method.min_models:
                expected = f"exactly {method.min_models}"
            else:
                expected = f"{method.min_models} to {method.max_models}"
            hint = ""
            if method.name == "passthrough" and config.models is not None:
                hint = "; use slices to stack layers from several models"
            raise MergeError(f"{where}: {method.name} takes {expected} {what}, got {counted}{hint}")
