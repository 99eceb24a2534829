"""Tiny real checkpoints for offline tests: Llama-, Mistral- and Qwen2-shaped, a few layers wide 32-64.

Weights come from `transformers` model classes (so names, shapes and config.json are genuine),
saved as safetensors with a small word-level tokenizer. A "fine-tune" is the base plus noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from merging.demo import write_tokenizer

VOCAB = 96
# A TIES merge of two fine-tunes onto their base (fill in base, ft1, ft2 with str.format).
TIES_CONFIG = """
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
"""

ARCHES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True, "use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 8}),
}


def _state_dict(arch: str, layers: int, hidden: int, seed: int, vocab: int) -> tuple[dict, dict]:
    import transformers

    config_name, model_name, extra = ARCHES[arch]
    config = getattr(transformers, config_name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config_dict = json.loads(config.to_json_string())
    config_dict["architectures"] = [model_name]
    config_dict["dtype"] = "float32"
    return state, config_dict


def save_model(directory: Path, state: dict, config: dict, *, card: Optional[str] = None,
               shards: int = 1, chat_template: Optional[str] = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[i * per:(i + 1) * per]}
            save_file(part, str(directory / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    write_tokenizer(directory, config["vocab_size"], chat_template)
    if card is not None:
        (directory / "README.md").write_text(card)
    return directory


class Family:
    """A base model and fine-tunes of one architecture, written once per test session."""

    def __init__(self, root: Path, arch: str = "llama", layers: int = 4, hidden: int = 32, vocab: int = VOCAB):
        self.root, self.arch, self.layers, self.hidden = root, arch, layers, hidden
        self.base_state, self.config = _state_dict(arch, layers, hidden, seed=0, vocab=vocab)

    def base(self, **kwargs) -> Path:
        return self._write("base", self.base_state, **kwargs)

    def finetune(self, index: int, scale: float = 0.02, sparsity: float = 0.0, **kwargs) -> Path:
        generator = torch.Generator().manual_seed(1000 + index)
        state = {}
        for name, tensor in self.base_state.items():
            noise = torch.randn(tensor.shape, generator=generator) * scale
            if sparsity:
                noise *= torch.rand(tensor.shape, generator=generator) >= sparsity
            state[name] = (tensor + noise).contiguous()
        return self._write(f"ft{index}", state, **kwargs)

    def _write(self, name: str, state: dict, dtype: torch.dtype = torch.float32, **kwargs) -> Path:
        directory = self.root / f"{self.arch}-{name}-{str(dtype).removeprefix('torch.')}"
        if (directory / "config.json").exists() and not kwargs:
            return directory
        config = dict(self.config, dtype=str(dtype).removeprefix("torch."))
        return save_model(directory, {k: v.to(dtype) for k, v in state.items()}, config, **kwargs)


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state
