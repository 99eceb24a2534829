"""Regenerate the mergekit-moe golden routers (run in mergekit's own virtualenv, never ours).

    python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit
    /tmp/mk/bin/python tests/golden/make_moe_golden.py

Writes `moe_inputs.safetensors` and `moe_inputs.json` (a tiny base and three fine-tunes per
architecture: Llama, Qwen2, Qwen3, built by transformers' own classes, so names, shapes and
configs are genuine), and per case of `moe_cases.yml` mergekit-moe 0.1.5's routers
(`moe_<case>.safetensors`) and its config.json (in `moe_configs.json`). The expert tensors need
no golden file: the tests check them against their sources bit for bit.
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
sys.path.insert(0, str(HERE.parent.parent))
MODELS = ("base", "ft1", "ft2", "ft3")
ARCHES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True, "use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 8}),
}
VOCAB = 48


def make_inputs() -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    import transformers

    tensors, configs = {}, {}
    for arch, (config_name, model_name, extra) in ARCHES.items():
        config = getattr(transformers, config_name)(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, **extra)
        torch.manual_seed(0)
        base = {k: v.detach().clone() for k, v in getattr(transformers, model_name)(config).state_dict().items()
                if not (config.tie_word_embeddings and k == "lm_head.weight")}
        base = {k: v + torch.randn(v.shape) * 0.1 if v.ndim == 1 else v for k, v in base.items()}  # norms not all 1
        config_dict = json.loads(config.to_json_string())
        config_dict.update(architectures=[model_name], dtype="float32")
        configs[arch] = config_dict
        generator = torch.Generator().manual_seed(7)
        for model in MODELS:
            noise = 0.0 if model == "base" else 0.05
            for name, tensor in base.items():
                tensors[f"{arch}-{model}.{name}"] = (tensor + torch.randn(tensor.shape, generator=generator) * noise
                                                     ).contiguous()
    return tensors, configs


def write_models(root: Path, tensors: dict[str, torch.Tensor], configs: dict[str, dict]) -> None:
    """The input models as directories (`<arch>-<model>`), with config.json and a word-level tokenizer."""
    from merging.demo import write_tokenizer

    for arch, config in configs.items():
        for model in MODELS:
            directory = root / f"{arch}-{model}"
            directory.mkdir(parents=True)
            prefix = f"{arch}-{model}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
            (directory / "config.json").write_text(json.dumps(config))
            write_tokenizer(directory, config["vocab_size"])


def main() -> None:
    cases = yaml.safe_load((HERE / "moe_cases.yml").read_text())
    tensors, configs = make_inputs()
    save_file(tensors, str(HERE / "moe_inputs.safetensors"))
    (HERE / "moe_inputs.json").write_text(json.dumps(configs, indent=1, sort_keys=True) + "\n")
    out_configs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_models(root / "models", tensors, configs)
        for case, config in cases.items():
            path = root / f"{case}.yml"
            path.write_text(yaml.safe_dump(config).replace("MODELS/", f"{root / 'models'}/"))
            subprocess.run([str(Path(sys.executable).parent / "mergekit-moe"), str(path), str(root / case)],
                           check=True, capture_output=True)
            merged = {}
            for file in sorted((root / case).glob("*.safetensors")):
                merged.update(load_file(str(file)))
            routers = {k: v for k, v in merged.items() if k.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))}
            save_file(routers, str(HERE / f"moe_{case}.safetensors"))
            out_configs[case] = json.loads((root / case / "config.json").read_text())
            print(case, len(routers), "routers")
    (HERE / "moe_configs.json").write_text(json.dumps(out_configs, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
