"""Mixtures of experts from dense models, from mergekit-moe configs.

A config with an `experts:` list builds a Mixtral, Qwen2-MoE or Qwen3-MoE model: attention,
norms and embeddings from `base_model`, each layer's MLP from every expert, and a router per
layer from the base model's view of each expert's prompts. The stages are the merge's own:
this module parses and validates the config from its text (no torch), `moe.plan` plans the
output from headers, `moe.routers` computes the routers, and the engine streams the copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

from ..errors import MergeError, check_keys, did_you_mean
from ..methods import EXPERT_COPY, MergeMethod
from ..refs import ModelRef, parse_model_ref, shown

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
# `architecture:` values -> output architecture; mergekit-moe matches its names by prefix ("qwen", "qwen3")
ARCHITECTURES = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen_moe": "qwen2_moe", "qwen": "qwen2_moe",
                 "qwen3_moe": "qwen3_moe", "qwen3": "qwen3_moe"}
_TOP_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
             "name", "description")
_EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
_MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class Expert:
    model: ModelRef
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


@dataclass(frozen=True)
class MoEConfig:
    """A validated mergekit-moe config. It answers the engine's questions as `MergeConfig` does."""

    base_model: ModelRef
    experts: tuple[Expert, ...]
    shared_experts: tuple[Expert, ...]
    gate_mode: str
    experts_per_token: int
    architecture: Optional[str]  # "mixtral", "qwen2_moe", "qwen3_moe", or None: chosen from the models
    out_dtype: Optional[str]  # mergekit-moe's `dtype` is the output's; None: the base model's
    text: str
    warnings: tuple[str, ...] = ()
    mapping: dict = field(default_factory=dict, compare=False, repr=False)

    method: ClassVar[MergeMethod] = EXPERT_COPY
    config_file: ClassVar[str] = "mergekit_moe_config.yml"  # the name lineage tools look for
    dtype: ClassVar[Optional[str]] = None  # inputs are copied as stored, then converted to `out_dtype`
    models: ClassVar[None] = None
    slices: ClassVar[None] = None
    tokenizer: ClassVar[None] = None  # the base's tokenizer, as it is
    chat_template: ClassVar[None] = None

    @property
    def all_experts(self) -> tuple[Expert, ...]:
        return self.experts + self.shared_experts

    def referenced_models(self) -> list[ModelRef]:
        """The base, then every expert, each once."""
        return list(dict.fromkeys([self.base_model, *(e.model for e in self.all_experts)]))


def _prompts(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(p, str) and p.strip() for p in raw):
        raise MergeError(f"{where}: must be a list of prompt strings, e.g. [\"write a python function\"]")
    for i, prompt in enumerate(raw):
        if len(prompt) > _MAX_PROMPT_CHARS:
            raise MergeError(f"{where}[{i}]: {len(prompt):,} characters; a routing prompt is an example of the "
                             f"expert's input, at most {_MAX_PROMPT_CHARS:,} characters")
    return tuple(raw)


def _number(raw: Any, where: str) -> Optional[float]:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw != raw or abs(raw) == float("inf"):
        raise MergeError(f"{where}: must be a finite number, got {shown(raw, 40)}")
    return float(raw)


def _experts(raw: Any, where: str, ref) -> tuple[Expert, ...]:
    if not isinstance(raw, list) or not raw:
        raise MergeError(f"{where}: must be a non-empty list of entries with 'source_model' and 'positive_prompts'")
    experts = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or "source_model" not in item:
            raise MergeError(f"{at}: each expert needs a 'source_model'")
        check_keys(item, _EXPERT_KEYS, f"{at}.")
        experts.append(Expert(ref(item["source_model"], f"{at}.source_model"),
                              _prompts(item.get("positive_prompts"), f"{at}.positive_prompts"),
                              _prompts(item.get("negative_prompts"), f"{at}.negative_prompts"),
                              _number(item.get("noise_scale"), f"{at}.noise_scale"),
                              _number(item.get("residual_scale"), f"{at}.residual_scale")))
    return tuple(experts)


def parse_moe_config(raw: dict, text: str, *, base_dir: Optional[Path] = None,
                     local_roots: Optional[Sequence[Path]] = None) -> MoEConfig:
    """Validate a mergekit-moe config (the YAML already read into `raw`); one-line `MergeError`s."""
    from ..config import _parse_dtype

    check_keys(raw, _TOP_KEYS, "")

    def ref(value: Any, where: str) -> ModelRef:
        return parse_model_ref(value, where, base_dir, local_roots)

    if not raw.get("base_model"):
        raise MergeError("base_model: required; the model whose attention, norms and embeddings the experts share")
    base = ref(raw["base_model"], "base_model")
    experts = _experts(raw.get("experts"), "experts", ref)
    shared = _experts(raw["shared_experts"], "shared_experts", ref) if raw.get("shared_experts") else ()

    gate_mode = raw.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise MergeError(f"gate_mode: unknown mode {shown(gate_mode, 40)}{did_you_mean(str(gate_mode), GATE_MODES)}; "
                         f"use {', '.join(GATE_MODES)}")
    per_token = raw.get("experts_per_token", 2)
    if isinstance(per_token, bool) or not isinstance(per_token, int) or not 1 <= per_token <= len(experts):
        raise MergeError(f"experts_per_token: must be a whole number from 1 to the {len(experts)} experts, got "
                         f"{shown(per_token, 40)}")
    architecture = raw.get("architecture")
    if architecture is not None:
        key = str(architecture).lower().replace("-", "_")
        if key.startswith("deepseek"):
            raise MergeError("architecture: DeepSeek MoE outputs are not supported; use mixtral, qwen2_moe or "
                             "qwen3_moe")
        if key not in ARCHITECTURES:
            raise MergeError(f"architecture: unknown {shown(architecture, 40)}"
                             f"{did_you_mean(key, ARCHITECTURES)}; use mixtral, qwen2_moe or qwen3_moe")
        architecture = ARCHITECTURES[key]

    if gate_mode in ("hidden", "cheap_embed"):
        for where, group in (("experts", experts), ("shared_experts", shared)):
            for i, expert in enumerate(group):
                if not expert.positive_prompts:
                    raise MergeError(f"{where}[{i}].positive_prompts: required with gate_mode {gate_mode}: examples "
                                     f"of what the router should send to {expert.model}")
        prompts = {(e.positive_prompts, e.negative_prompts) for e in experts}
        if len(experts) > 1 and len(prompts) == 1:
            raise MergeError("experts: every expert has the same prompts, so every router sends tokens everywhere "
                             "alike; give each expert prompts that show what it should receive")
    if len(experts) > 1 and len({e.model for e in experts}) == 1:
        raise MergeError(f"experts: every expert is {experts[0].model}: the mixture would cost more and answer the "
                         f"same; name different fine-tunes")

    warnings = []
    if len(experts) & (len(experts) - 1):
        warnings.append(f"experts: {len(experts)} experts is not a power of two; llama.cpp will not load the result")
    return MoEConfig(base, experts, shared, gate_mode, per_token, architecture,
                     _parse_dtype(raw.get("dtype"), "dtype"), text, tuple(warnings), raw)
