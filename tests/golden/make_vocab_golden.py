"""Regenerate the mergekit goldens for differing vocabularies (run in mergekit's own virtualenv).

    /tmp/mk/bin/python tests/golden/make_vocab_golden.py

The inputs are the golden models of `make_golden.py` (no extra file): `base` with a word-level
tokenizer of 32 tokens, `chatml` (ft1 with `<|im_start|>` and `<|im_end|>` added at ids 32 and 33,
and their embedding and LM-head rows) and `tool` (ft2 with `<tool>` added at id 32, the id ChatML's
first token has in `chatml`). Writes mergekit 0.1.5's output for each case of `vocab_cases.yml`
(`vocab_<case>.safetensors`) and its tokenizers' vocabularies (`vocab_tokenizers.json`).
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
ADDED = {"base": ("ft0", ()), "chatml": ("ft1", ("<|im_start|>", "<|im_end|>")), "tool": ("ft2", ("<tool>",))}


def write_models(root: Path) -> dict[str, Path]:
    """The three models as directories, from the golden inputs; added tokens get rows of their own."""
    from golden.make_golden import CONFIG
    from merging.demo import write_tokenizer

    tensors = load_file(str(HERE / "inputs.safetensors"))
    paths = {}
    for name, (source, added) in ADDED.items():
        prefix = "base." if source == "ft0" else f"{source}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        generator = torch.Generator().manual_seed(len(name))
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            extra = torch.randn(len(added), state[key].shape[1], generator=generator) * 0.5
            state[key] = torch.cat([state[key], extra]).contiguous()
        directory = root / name
        directory.mkdir(parents=True)
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(dict(CONFIG, vocab_size=32 + len(added))))
        write_tokenizer(directory, 32, added=added)
        paths[name] = directory
    return paths


def main() -> None:
    cases = yaml.safe_load((HERE / "vocab_cases.yml").read_text())
    vocabularies = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_models(root / "models")
        for case, config in cases.items():
            path = root / f"{case}.yml"
            path.write_text(yaml.safe_dump(config).replace("MODELS/", f"{root / 'models'}/"))
            subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(path), str(root / case)],
                           check=True, capture_output=True)
            save_file(load_file(str(root / case / "model.safetensors")), str(HERE / f"vocab_{case}.safetensors"))
            tokenizer = json.loads((root / case / "tokenizer.json").read_text())
            vocabularies[case] = {"vocab": tokenizer["model"]["vocab"],
                                  "added": {t["content"]: t["id"] for t in tokenizer["added_tokens"]},
                                  "vocab_size": json.loads((root / case / "config.json").read_text())["vocab_size"]}
            print(case, vocabularies[case]["vocab_size"])
    (HERE / "vocab_tokenizers.json").write_text(json.dumps(vocabularies, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
