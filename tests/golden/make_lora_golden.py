"""Regenerate the mergekit goldens for `model+lora` inputs (run in mergekit's own virtualenv).

    /tmp/mk/bin/python tests/golden/make_lora_golden.py

Writes two PEFT adapters on the golden `base` of `make_golden.py` (`lora_<name>/`: plain LoRA on
attention, and rsLoRA with rank and alpha patterns, LoRA on the embeddings and a module saved
whole), and mergekit 0.1.5's output for each case of `lora_cases.yml` (`lora_<case>.safetensors`);
mergekit applies adapters with peft's merge_and_unload.
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
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]
ADAPTERS = {
    "attention": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "patterns": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["embed_tokens", "down_proj", "up_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 4}, modules_to_save=["model.norm"]),
}


def write_models(root: Path) -> None:
    """The golden models base, ft1, ft2 and ft3 as directories."""
    from golden.make_golden import CONFIG, MODELS

    tensors = load_file(str(HERE / "inputs.safetensors"))
    for name in MODELS:
        (root / name).mkdir(parents=True)
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        save_file(state, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps(CONFIG))


def make_adapter(base: Path, folder: Path, seed: int, **lora):
    """A PEFT LoRA adapter on `base` with random (seeded) weights, B included (peft starts B at zero),
    saved to `folder`; returns the peft model."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    wrapped.save_pretrained(folder)
    (folder / "README.md").unlink()  # peft's template card: nothing the tests read
    return wrapped


def main() -> None:
    cases = yaml.safe_load((HERE / "lora_cases.yml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_models(root / "models")
        for seed, (name, lora) in enumerate(ADAPTERS.items()):
            make_adapter(root / "models" / "base", HERE / f"lora_{name}", seed, **lora)
        for case, config in cases.items():
            path = root / f"{case}.yml"
            text = yaml.safe_dump(config).replace("ADAPTERS/", f"{HERE}/").replace("MODELS/", f"{root / 'models'}/")
            path.write_text(text)
            subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(path), str(root / case),
                            "--lora-merge-cache", str(root / "lora-cache")], check=True, capture_output=True)
            save_file(load_file(str(root / case / "model.safetensors")), str(HERE / f"lora_{case}.safetensors"))
            print(case)


if __name__ == "__main__":
    main()
