"""Tiny Llama-shaped checkpoints made locally, so a fresh install can run a merge with no network."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .safetensors_io import OutputTensor, ShardedWriter

DEMO_NAMES = ("demo-base", "demo-chat", "demo-code")
_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2,
}


def write_tokenizer(directory: Path, vocab: int, chat_template: str | None = None,
                    added: tuple[str, ...] = ()) -> None:
    """A word-level tokenizer (`w0 w1 ...`, `vocab` of them with the specials) that transformers loads
    with PreTrainedTokenizerFast; `added` tokens (ChatML's, say) follow at ids `vocab`, `vocab + 1`..."""
    specials = ["<unk>", "<s>", "</s>"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))] + list(added)
    special_ids = list(range(len(specials))) + list(range(vocab, vocab + len(added)))
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": words[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special_ids],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": "<unk>"},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 256}
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama/Mistral-shaped checkpoint with `config`'s widths."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def ensure_demo_models(root: Path) -> dict[str, Path]:
    """Create (once) a base and two fine-tunes of it under `root`; returns their directories."""
    shapes = llama_shapes(_CONFIG)
    generator = torch.Generator().manual_seed(0)
    base = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=generator) * 0.05)
            for n, s in shapes.items()}
    paths = {}
    for index, name in enumerate(DEMO_NAMES):
        directory = Path(root) / name
        paths[name] = directory
        if (directory / "config.json").is_file():
            continue
        directory.mkdir(parents=True, exist_ok=True)
        noise = torch.Generator().manual_seed(100 + index)
        state = {n: t if index == 0 else t + torch.randn(t.shape, generator=noise) * 0.01 for n, t in base.items()}
        writer = ShardedWriter(directory, [OutputTensor(n, torch.float32, tuple(t.shape)) for n, t in state.items()],
                               10**12)
        for n, t in state.items():
            writer.write(n, t.contiguous())
        writer.close()
        write_tokenizer(directory, _CONFIG["vocab_size"])
        (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        (directory / "config.json").write_text(json.dumps(_CONFIG, indent=2))
        (directory / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# {name}\nA tiny demo model.\n")
    return paths


def demo_config(root: Path) -> str:
    paths = ensure_demo_models(root)
    return f"""\
# Offline demo: tiny models created on this machine, merged with TIES.
merge_method: ties
base_model: {paths['demo-base']}
models:
  - model: {paths['demo-chat']}
    parameters:
      weight: 0.6
      density: 0.5
  - model: {paths['demo-code']}
    parameters:
      weight: 0.4
      density: 0.5
parameters:
  normalize: true
dtype: float32
"""


def demo_moe_config(root: Path) -> str:
    paths = ensure_demo_models(root)
    return f"""\
# Offline demo: a mixture of experts of tiny local models, routed by hidden states.
base_model: {paths['demo-base']}
gate_mode: hidden
dtype: float32
experts_per_token: 1
experts:
  - source_model: {paths['demo-chat']}
    positive_prompts: ["w1 w2 w3", "w4 w5 w6"]
  - source_model: {paths['demo-code']}
    positive_prompts: ["w40 w41 w42", "w50 w51"]
    negative_prompts: ["w1 w2 w3"]
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m merging.demo DIR``: write the tiny models, their TIES config (DIR/demo.yml) and
    a mixture of experts of them (DIR/demo-moe.yml), so ``python -m merging DIR/demo.yml OUT``
    runs a merge with no network."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m merging.demo", description=main.__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where the tiny models and demo.yml go")
    args = parser.parse_args(argv)
    args.directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("demo.yml", demo_config), ("demo-moe.yml", demo_moe_config)):
        (args.directory / name).write_text(text(args.directory / "models"))
        print(args.directory / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
