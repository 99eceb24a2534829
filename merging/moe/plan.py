"""The plan of a mixture of experts, from configs and headers only: which tensor of which model
becomes which output tensor, in the names transformers' `save_pretrained` writes for the output
architecture, and which routers and zero biases are computed instead of copied."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from ..architecture import Layout, detect_layout, text_config
from ..errors import MergeError
from ..plan import MergePlan, PlannedTensor, torch_dtype
from ..refs import ModelRef
from ..safetensors_io import OutputTensor
from ..sources import ModelSource
from . import MoEConfig

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class OutputArchitecture:
    name: str  # the `architecture:` value
    model_type: str
    class_name: str
    inputs: tuple[str, ...]  # model types it is built from
    shared_experts: int  # how many shared experts it takes
    router: str  # per-layer names after "<prefix>.<layer>."
    expert: str
    shared: Optional[str] = None
    shared_router: Optional[str] = None
    expert_names: tuple[tuple[str, str], ...] = ()  # dense projection -> expert tensor, when renamed
    attention_bias: bool = False  # q/k/v biases always present (zeros when the base has none)

    def expert_tensor(self, prefix: str, layer: int, expert: int, projection: str) -> str:
        own = dict(self.expert_names).get(projection, projection)
        return f"{prefix}.{layer}.{self.expert.format(expert=expert, projection=own)}"


OUTPUTS = {
    "mixtral": OutputArchitecture(
        "mixtral", "mixtral", "MixtralForCausalLM", ("llama", "mistral"), 0,
        "block_sparse_moe.gate.weight", "block_sparse_moe.experts.{expert}.{projection}.weight",
        expert_names=(("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))),
    "qwen2_moe": OutputArchitecture(
        "qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), 1,
        "mlp.gate.weight", "mlp.experts.{expert}.{projection}.weight", shared="mlp.shared_expert.{projection}.weight",
        shared_router="mlp.shared_expert_gate.weight", attention_bias=True),
    "qwen3_moe": OutputArchitecture(
        "qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), 0,
        "mlp.gate.weight", "mlp.experts.{expert}.{projection}.weight"),
}


def model_type(source: ModelSource) -> str:
    return str(text_config(source.config).get("model_type") or source.config.get("model_type") or "unknown")


def choose_output(config: MoEConfig, base: ModelSource) -> OutputArchitecture:
    """The output architecture `architecture:` names, or mergekit-moe's choice for these inputs."""
    kind, shared = model_type(base), len(config.shared_experts)
    if config.architecture is not None:
        chosen = OUTPUTS[config.architecture]
    elif shared:
        chosen = OUTPUTS["qwen2_moe"]
    elif kind == "qwen3":
        chosen = OUTPUTS["qwen3_moe"]
    elif kind == "qwen2":
        raise MergeError("shared_experts: a mixture of Qwen2 experts is a Qwen2-MoE, which needs exactly one shared "
                         "expert; add shared_experts with one entry")
    else:
        chosen = OUTPUTS["mixtral"]
    if kind not in chosen.inputs:
        supported = ", ".join(f"{name} from {'/'.join(a.inputs)}" for name, a in OUTPUTS.items())
        raise MergeError(f"base_model: {base.label} is a {kind} model; a {chosen.name} output is built from "
                         f"{'/'.join(chosen.inputs)} models (supported: {supported})")
    if shared != chosen.shared_experts:
        raise MergeError(f"shared_experts: {chosen.name} takes {chosen.shared_experts or 'no'} shared expert"
                         f"{'s' * (chosen.shared_experts != 1)}, got {shared}"
                         + ("; remove shared_experts or use architecture: qwen2_moe" if not chosen.shared_experts
                            else ""))
    return chosen


def _check_expert(where: str, source: ModelSource, base: ModelSource, base_layout: Layout) -> Layout:
    """An expert must be a dense model of the base's architecture with the base's MLP shapes; returns
    its layout."""
    config = text_config(source.config)
    if any(k in config for k in ("num_local_experts", "num_experts")) or any(".experts." in n for n in source.tensors):
        raise MergeError(f"{where}: {source.label} is already a mixture of experts; name the dense fine-tunes it "
                         f"was built from")
    if model_type(source) != model_type(base):
        raise MergeError(f"{where}: {source.label} is a {model_type(source)} model and base_model {base.label} a "
                         f"{model_type(base)} one; every expert must share the base's architecture")
    layout = detect_layout(source)
    if layout.num_layers != base_layout.num_layers:
        raise MergeError(f"{where}: {source.label} has {layout.num_layers} layers and the base "
                         f"{base_layout.num_layers}; "
                         f"experts must have the base's layers")
    for layer in range(base_layout.num_layers):
        for projection in PROJECTIONS:
            name = base_layout.layer_tensor(layer, f"mlp.{projection}.weight")
            mine = source.tensors.get(layout.layer_tensor(layer, f"mlp.{projection}.weight"))
            if mine is None:
                raise MergeError(f"{where}: {source.label} has no {name}; experts must be "
                                 f"{'/'.join(DENSE_TYPES)}-shaped models")
            if mine.shape != base.tensors[name].shape:
                raise MergeError(f"{where}: {name} is {list(mine.shape)} in {source.label} and "
                                 f"{list(base.tensors[name].shape)} in the base; experts must have the base's shapes")
    return layout


def _base_dtype(base: ModelSource) -> Optional[torch.dtype]:
    config = text_config(base.config)
    name = config.get("torch_dtype") or config.get("dtype") or base.config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def output_config(base: ModelSource, arch: OutputArchitecture, config: MoEConfig) -> dict:
    """config.json of the mixture: the base's, with the keys transformers' MoE config class reads."""
    out = copy.deepcopy(base.config)
    intermediate = text_config(base.config).get("intermediate_size")
    out.update(architectures=[arch.class_name], model_type=arch.model_type,
               num_experts_per_tok=config.experts_per_token, output_router_logits=False, router_aux_loss_coef=0.001)
    if arch.name == "mixtral":
        out.update(num_local_experts=len(config.experts), sliding_window=None, router_jitter_noise=0.0)
    else:  # transformers 5 writes qwen3_moe's count as num_local_experts, other readers (llama.cpp) num_experts
        out.update(num_experts=len(config.experts), decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[],
                   moe_intermediate_size=intermediate)
    if arch.name == "qwen3_moe":
        out.update(num_local_experts=len(config.experts))
    if arch.name == "qwen2_moe":
        out.update(shared_expert_intermediate_size=intermediate, sliding_window=None, use_sliding_window=False,
                   qkv_bias=True)
    return out


def build_moe_plan(config: MoEConfig, sources: dict[ModelRef, ModelSource]) -> MergePlan:
    """Plan the mixture from headers; raises `MergeError` for anything that would fail later."""
    models = [sources[ref] for ref in config.referenced_models()]
    index_of = {source.ref: i for i, source in enumerate(models)}
    base = sources[config.base_model]
    if model_type(base) not in DENSE_TYPES:
        raise MergeError(f"base_model: {base.label} is a {model_type(base)} model; mixtures of experts are built from "
                         f"{', '.join(DENSE_TYPES)} models")
    layout = detect_layout(base)
    arch = choose_output(config, base)
    expert_layouts: dict[ModelRef, Layout] = {}
    for where, group in (("experts", config.experts), ("shared_experts", config.shared_experts)):
        for i, expert in enumerate(group):
            expert_layouts[expert.model] = _check_expert(f"{where}[{i}].source_model", sources[expert.model], base,
                                                         layout)
    out_dtype = torch_dtype(config.out_dtype) or _base_dtype(base)
    hidden = base.tensors[layout.layer_tensor(0, "mlp.down_proj.weight")].shape[0]
    gate_dtype = out_dtype or (torch.bfloat16 if config.gate_mode == "hidden" else torch.float32)
    tensors: list[PlannedTensor] = []
    computed: dict[str, torch.Tensor] = {}

    def copy_of(name: str, source: ModelSource, in_name: str, expert=None, residual: bool = False) -> None:
        header = source.tensors[in_name]
        dtype = out_dtype if out_dtype is not None and header.dtype.is_floating_point else header.dtype
        params = {"noise_scale": expert.noise_scale if expert else None,
                  "residual_scale": expert.residual_scale if expert and residual else None}
        tensors.append(PlannedTensor(name, OutputTensor(name, dtype, header.shape), ((index_of[source.ref], in_name),),
                                     None, params, floating=header.dtype.is_floating_point,
                                     whole=params["noise_scale"] is not None))

    def computed_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, value=None) -> None:
        tensors.append(PlannedTensor(name, OutputTensor(name, dtype, shape), (), None, {}, computed=True))
        if value is not None:
            computed[name] = value

    for name in layout.pre:
        copy_of(name, base, name)
    for layer in range(layout.num_layers):
        suffixes = layout.layer_suffixes[layer]
        for suffix in suffixes:
            if suffix.startswith("mlp."):
                if suffix.removeprefix("mlp.").removesuffix(".weight") not in PROJECTIONS:
                    raise MergeError(f"base_model: {layout.layer_tensor(layer, suffix)} is not a gate, up or down "
                                     f"projection weight; MLPs with biases or other parts cannot become experts")
                continue
            if arch.name == "mixtral" and suffix.startswith("self_attn.") and suffix.endswith(".bias"):
                raise MergeError(f"base_model: {base.label} has attention biases, which Mixtral lacks; use "
                                 f"architecture: qwen2_moe")
            copy_of(layout.layer_tensor(layer, suffix), base, layout.layer_tensor(layer, suffix))
        if arch.attention_bias:
            for projection in ("q_proj", "k_proj", "v_proj"):
                if f"self_attn.{projection}.bias" not in suffixes:
                    weight = base.tensors[layout.layer_tensor(layer, f"self_attn.{projection}.weight")]
                    name = layout.layer_tensor(layer, f"self_attn.{projection}.bias")
                    dtype = out_dtype or weight.dtype
                    computed_tensor(name, weight.shape[:1], dtype, torch.zeros(weight.shape[:1], dtype=dtype))
        computed_tensor(layout.layer_tensor(layer, arch.router), (len(config.experts), hidden), gate_dtype)
        for e, expert in enumerate(config.experts):
            for projection in PROJECTIONS:
                copy_of(arch.expert_tensor(layout.prefix, layer, e, projection), sources[expert.model],
                        expert_layouts[expert.model].layer_tensor(layer, f"mlp.{projection}.weight"),
                        expert, residual=projection == "down_proj")
        for expert in config.shared_experts:
            for projection in PROJECTIONS:
                copy_of(layout.layer_tensor(layer, arch.shared.format(projection=projection)), sources[expert.model],
                        expert_layouts[expert.model].layer_tensor(layer, f"mlp.{projection}.weight"), expert,
                        residual=projection == "down_proj")
            computed_tensor(layout.layer_tensor(layer, arch.shared_router), (1, hidden), gate_dtype)
    for name in layout.post:
        copy_of(name, base, name)

    reads, side_peak = _router_reads(config, base, layout, index_of[base.ref])
    prompts = sum(len(e.positive_prompts) + len(e.negative_prompts) for e in config.all_experts)
    shared = f" and {len(config.shared_experts)} shared" if config.shared_experts else ""
    routed = f" from {prompts} prompts" if config.gate_mode in ("hidden", "cheap_embed") else ""
    per_token = config.experts_per_token
    details = (f"output: {arch.class_name}, {len(config.experts)} experts{shared}, {per_token} per token",
               f"routers: {config.gate_mode}{routed}")
    return MergePlan(config, models, tensors, output_config(base, arch, config), base, base, list(config.warnings),
                     also_reads=reads, computed=computed, details=details, side_peak_bytes=side_peak)


def _router_reads(config: MoEConfig, base: ModelSource, layout: Layout, index: int) -> tuple[tuple, int]:
    """The base tensors the routers read, and the memory their computation holds at once."""
    embedding = next((n for n in layout.pre if n.endswith("embed_tokens.weight")), None)
    if config.gate_mode == "random" or config.gate_mode == "uniform_random":
        return (), 0
    if embedding is None:
        raise MergeError(f"base_model: {base.label} has no embed_tokens tensor for gate_mode {config.gate_mode}; "
                         f"use gate_mode: random")
    if config.gate_mode == "cheap_embed":
        return ((index, embedding),), 64 * 2**20
    names = [embedding] + [layout.layer_tensor(layer, suffix) for layer in range(layout.num_layers)
                           for suffix in layout.layer_suffixes[layer]]
    largest_layer = max(sum(base.tensors[layout.layer_tensor(layer, s)].numel for s in layout.layer_suffixes[layer])
                        for layer in range(layout.num_layers))
    # one layer in bfloat16 (and its float32 norms' scratch), transformers' own import, and activations
    return tuple((index, n) for n in names), 2 * largest_layer + 700 * 2**20
