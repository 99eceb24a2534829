"""The routers of a mixture of experts, with mergekit-moe's formulas.

- `hidden`: for each expert, the base model's hidden state at the last token of each positive
  prompt, at the input of every layer, averaged over the prompts, minus the same for the negative
  prompts, normalised per layer. The base runs in bfloat16, as mergekit-moe runs it, but **one
  decoder layer at a time**: a layer's weights are loaded, every prompt's activations go through
  it, and it is freed. The layers are transformers' own modules (built on the meta device), so
  the forward pass is exactly the model's; the arguments each layer receives (masks, rotary
  embeddings) are recorded from the model's own forward with the layers stubbed out.
- `cheap_embed`: the normalised sum of the prompts' token embeddings, the same for every layer.
- `random` / `uniform_random`: normal, or uniform in +-1/sqrt(hidden) as torch initialises a
  Linear layer, drawn from `--seed`.

transformers is imported only here, for the tokenizer and the layer modules.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch

from ..architecture import detect_layout
from ..errors import MergeError
from ..plan import MergePlan
from ..sources import ModelSource
from . import MoEConfig

Say = Callable[[str], None]


def router_weights(config: MoEConfig, base: ModelSource, *, seed: int = 0, device: str = "cpu",
                   say: Optional[Say] = None) -> torch.Tensor:
    """Router vectors, [layers, experts + shared experts, hidden], as mergekit-moe's `get_gate_params`."""
    say = say or (lambda line: None)
    layout = detect_layout(base)
    experts = config.all_experts
    hidden = base.tensors[layout.layer_tensor(0, "mlp.down_proj.weight")].shape[0]
    shape = (layout.num_layers, len(experts), hidden)
    if config.gate_mode == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if config.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 * scale - scale

    tokenizer = _tokenizer(base)
    groups = [prompts for e in experts for prompts in (e.positive_prompts, e.negative_prompts) if prompts]
    batches = {prompts: _tokenize(tokenizer, prompts) for prompts in groups}
    embedding = next(n for n in layout.pre if n.endswith("embed_tokens.weight"))
    reader = base.reader()
    try:
        if config.gate_mode == "cheap_embed":
            features = {prompts: _cheap_embedding(reader, embedding, batch, layout.num_layers)
                        for prompts, batch in batches.items()}
        else:
            features = _hidden_states(base, layout, reader, embedding, batches, torch.device(device), say)
    finally:
        reader.close()
    vectors = []
    for expert in experts:
        vector = features[expert.positive_prompts].clone()
        if expert.negative_prompts:
            vector -= features[expert.negative_prompts]
        vector /= vector.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vectors.append(vector)
    return torch.stack(vectors, dim=0).permute(1, 0, 2).to("cpu")


def fill_routers(plan: MergePlan, weights: torch.Tensor) -> None:
    """Put each layer's router (and shared expert router) into the plan's computed tensors."""
    config: MoEConfig = plan.config
    routers = [t.name for t in plan.tensors if t.computed and t.name not in plan.computed]
    per_layer = 1 + bool(config.shared_experts)
    count = len(config.experts)
    for layer in range(weights.shape[0]):
        names = routers[layer * per_layer:(layer + 1) * per_layer]
        plan.computed[names[0]] = weights[layer, :count].contiguous()
        if config.shared_experts:
            plan.computed[names[1]] = weights[layer, count:].contiguous()


def degenerate_layers(weights: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose routers barely tell the experts apart (mergekit's condition-number warning)."""
    if weights.shape[1] < 2:
        return []
    return [layer for layer in range(weights.shape[0]) if torch.linalg.cond(weights[layer].float()) > threshold]


def _tokenizer(base: ModelSource):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base.local_dir), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the same problem for the user
        raise MergeError(f"base_model: its tokenizer does not load ({type(exc).__name__}: {str(exc)[:120]}); "
                         f"gate_mode hidden and cheap_embed tokenize the prompts with it, random does not") from None
    # mergekit-moe: left padding with the BOS token, so the last position is every prompt's own last token
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenize(tokenizer, prompts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return dict(tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                          add_special_tokens=False))


def _rows(reader, name: str, ids: torch.Tensor) -> torch.Tensor:
    """Embedding rows for `ids`, read one by one: a prompt needs a few hundred of a vocabulary's rows."""
    unique, positions = torch.unique(ids, return_inverse=True)
    rows = torch.cat([reader.read(name, (int(i), int(i) + 1)) for i in unique])
    return rows[positions]


def _cheap_embedding(reader, name: str, batch: dict[str, torch.Tensor], layers: int) -> torch.Tensor:
    h = _rows(reader, name, batch["input_ids"]).float()
    embedded = (h * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return (embedded / embedded.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)


class _RowEmbedding(torch.nn.Module):
    """The input embedding as a module that reads only the rows the prompts use."""

    def __init__(self, reader, name: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.reader, self.name, self.dtype, self.device = reader, name, dtype, device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _rows(self.reader, self.name, input_ids.cpu()).to(self.device, self.dtype)


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get parameters on the meta device and real buffers (rotary frequencies)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _skeleton(base: ModelSource):
    """The base model as transformers builds it, with every parameter on the meta device."""
    import transformers

    settings = {k: v for k, v in base.config.items() if k != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(base.config["model_type"], **settings)
        with _parameters_on_meta():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                                  attn_implementation="sdpa")
    except Exception as exc:  # noqa: BLE001 - an architecture transformers does not know, or a broken config
        raise MergeError(f"base_model: transformers cannot build {base.label} for gate_mode hidden "
                         f"({type(exc).__name__}: {str(exc)[:120]}); use gate_mode cheap_embed or random") from None
    return model.eval()


def _hidden_states(base: ModelSource, layout, reader, embedding: str, batches: dict, device: torch.device,
                   say: Say) -> dict[tuple[str, ...], torch.Tensor]:
    """Per prompt group: the last token's hidden state at each layer's input, averaged over the prompts."""
    model = _skeleton(base)
    model.set_input_embeddings(_RowEmbedding(reader, embedding, torch.bfloat16, device))
    rotary = [m for m in model.modules() if hasattr(m, "inv_freq")]
    for module in rotary:
        module.to(device)
    layers = model.get_submodule(layout.prefix)
    calls: dict[tuple[str, ...], list[tuple[torch.Tensor, tuple, dict]]] = {}
    states: dict[tuple[str, ...], torch.Tensor] = {}
    with torch.no_grad():
        for prompts, batch in batches.items():  # the model's own forward, with every layer a recorder
            calls[prompts] = _record_layer_calls(model, layers, batch, device)
            states[prompts] = calls[prompts][0][0]
        features: dict[tuple[str, ...], list[torch.Tensor]] = {p: [] for p in batches}
        for index, layer in enumerate(layers):
            state = {s: reader.read(layout.layer_tensor(index, s)).to(torch.bfloat16) for s in
                     layout.layer_suffixes[index]}
            try:
                layer.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as exc:
                raise MergeError(f"base_model: layer {index}'s tensors do not match transformers' "
                                 f"{type(layer).__name__} ({str(exc).splitlines()[-1][:120]})") from None
            layer.to(device)
            del state
            for prompts, (_, args, kwargs) in ((p, calls[p][index]) for p in batches):
                last = states[prompts][:, -1, :]
                features[prompts].append(last.sum(dim=0) / last.shape[0])
                output = layer(states[prompts], *args, **kwargs)
                states[prompts] = output[0] if isinstance(output, tuple) else output
            layer.to("meta")  # frees the weights
            say(f"  routers: layer {index + 1}/{len(layers)}")
    return {p: torch.stack(f).cpu() for p, f in features.items()}


def _record_layer_calls(model, layers, batch: dict[str, torch.Tensor], device: torch.device) -> list:
    """The (args, kwargs) each decoder layer receives for `batch`, from the model's own forward."""
    recorded: list[tuple[torch.Tensor, tuple, dict]] = []
    for index, layer in enumerate(layers):
        def record(*args, _last=index == len(layers) - 1, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            recorded.append((hidden, args[1:], kwargs))
            if _last:
                raise _Stop
            return hidden

        layer.forward = record
    try:
        model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         use_cache=False)
    except _Stop:
        pass
    finally:
        for layer in layers:
            del layer.forward
    return recorded
