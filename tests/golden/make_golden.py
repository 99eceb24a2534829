"""Regenerate the mergekit golden tensors (run in mergekit's own virtualenv, never ours).

    python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit
    /tmp/mk/bin/python tests/golden/make_golden.py

Writes `inputs.safetensors` (four tiny Llama-shaped float32 models, prefixed `base.`, `ft1.` ...)
and `<case>.safetensors` (mergekit 0.1.5's output for each case in `cases.yml`). The tests merge
the same inputs with the same configs and compare. Only these small tensors are committed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
MODELS = ("base", "ft1", "ft2", "ft3")
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2,
}


def make_inputs() -> dict[str, dict[str, torch.Tensor]]:
    h, i, v, kv = 16, 32, 32, 8
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    g = torch.Generator().manual_seed(1234)
    base = {n: torch.randn(s, generator=g) * 0.5 for n, s in shapes.items()}
    models = {"base": base}
    for name in MODELS[1:]:
        # fine-tunes: dense small noise plus a few large, sign-mixed updates (what TIES cares about)
        models[name] = {n: t + torch.randn(t.shape, generator=g) * 0.05
                        + (torch.rand(t.shape, generator=g) < 0.1) * torch.randn(t.shape, generator=g) * 0.5
                        for n, t in base.items()}
    return models


def main() -> None:
    cases = yaml.safe_load((HERE / "cases.yml").read_text())
    models = make_inputs()
    save_file({f"{m}.{n}": t for m, state in models.items() for n, t in state.items()}, str(HERE / "inputs.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, state in models.items():
            (root / name).mkdir()
            save_file(state, str(root / name / "model.safetensors"), metadata={"format": "pt"})
            (root / name / "config.json").write_text(json.dumps(CONFIG))
        for case, config in cases.items():
            text = yaml.safe_dump(config).replace("MODELS/", f"{root}/")
            (root / f"{case}.yml").write_text(text)
            out = root / f"out-{case}"
            subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(root / f"{case}.yml"), str(out),
                            "--no-copy-tokenizer"], check=True, capture_output=True)
            merged = {}
            for file in out.glob("*.safetensors"):
                merged.update(load_file(str(file)))
            save_file(merged, str(HERE / f"{case}.safetensors"))
            print(case, len(merged))


if __name__ == "__main__":
    main()
