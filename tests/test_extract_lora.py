"""LoRA extraction: an exact low-rank fine-tune round-trips through the adapter (with peft and with
our own `base+adapter` merges), memory stays a few tensors, and bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import Family, load_state, save_model

from merging import MergeError, parse_config, run_merge
from merging.extract import low_rank, plan_extraction, run_extraction

ROOT = Path(__file__).resolve().parent.parent
UPDATED = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A base and a fine-tune that differs by an exact rank-3 update on q, v and down projections,
    and by a shifted input norm."""
    family = Family(tmp_path_factory.mktemp("extract"), layers=2, hidden=32)
    base = family.base()
    generator = torch.Generator().manual_seed(5)
    state = {}
    for name, tensor in family.base_state.items():
        if name.endswith(tuple(f"{m}.weight" for m in UPDATED)):
            b = torch.randn(tensor.shape[0], 3, generator=generator) * 0.1
            a = torch.randn(3, tensor.shape[1], generator=generator) * 0.1
            tensor = tensor + b @ a
        if name.endswith("input_layernorm.weight"):
            tensor = tensor + 0.01
        state[name] = tensor.contiguous()
    finetuned = save_model(family.root / "finetuned", state, dict(family.config, dtype="float32"))
    return finetuned, base, state


def test_an_exact_low_rank_update_round_trips(pair, tmp_path):
    finetuned, base, state = pair
    events = []
    plan = plan_extraction(str(finetuned), str(base), 4, modules=UPDATED)
    run_extraction(plan, tmp_path / "adapter", on_event=events.append)
    lines = [e.message for e in events]
    assert any("rank 4 keeps 100.0% of the difference" in line for line in lines)
    assert any("changed but not in the adapter: input_layernorm (2)" in line for line in lines)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and sorted(config["target_modules"]) == sorted(UPDATED)
    assert config["base_model_name_or_path"] == str(base)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model_relation"] == "adapter"

    # peft applies it on the base and gets the fine-tune back
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    for name, want in state.items():
        if "layernorm" not in name:
            torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-5)

    # and so does our own merge of `base+adapter`
    run_merge(parse_config(f"merge_method: passthrough\nmodels:\n  - model: {base}+{tmp_path / 'adapter'}\n"),
              tmp_path / "applied")
    applied = load_state(tmp_path / "applied")
    torch.testing.assert_close(applied["model.layers.1.mlp.down_proj.weight"],
                               state["model.layers.1.mlp.down_proj.weight"], rtol=0, atol=1e-5)


def test_modules_to_save_store_changed_norms_whole(pair, tmp_path):
    finetuned, base, state = pair
    plan = plan_extraction(str(finetuned), str(base), 2, modules=("q_proj",), save_modules=("input_layernorm",))
    events = []
    run_extraction(plan, tmp_path / "adapter", on_event=events.append)
    saved = load_state(tmp_path / "adapter")
    name = "base_model.model.model.layers.0.input_layernorm.weight"
    assert torch.equal(saved[name], state["model.layers.0.input_layernorm.weight"])
    assert saved["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["input_layernorm"]
    # rank 2 of a rank-3 difference keeps part of it, and says how much
    assert any("rank 2 keeps" in e.message and "100.0%" not in e.message for e in events)


def test_randomized_svd_is_exact_for_a_low_rank_difference():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(1500, 8, generator=generator) @ torch.randn(8, 1200, generator=generator)
    u, s, vh = low_rank(delta, 8)
    torch.testing.assert_close(u * s @ vh, delta, rtol=0, atol=1e-3)
    u2, s2, vh2 = low_rank(delta, 8)
    assert torch.equal(s, s2)  # seeded: the same adapter every run


def test_cli_extracts_and_refuses_bad_input_in_one_line(pair, tmp_path, hub):
    finetuned, base, _ = pair

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "merging.extract_lora", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120, env={**os.environ, "HF_ENDPOINT": hub.endpoint})

    done = cli(str(finetuned), str(base), str(tmp_path / "out"), "--rank", "3", "--modules", "q_proj,v_proj")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    dry = cli(str(finetuned), str(base), str(tmp_path / "dry"), "--rank", "8", "--dry-run")
    assert dry.returncode == 0 and "LoRA of rank 8 on 14 weights" in dry.stdout and not (tmp_path / "dry").exists()

    other = Family(tmp_path / "wide", layers=2, hidden=48).base()
    for args, message in [
        ((str(finetuned), str(base), str(tmp_path / "a"), "--rank", "4", "--modules", "q_prj"),
         "--modules: no layer weight is named 'q_prj' (did you mean 'q_proj'?)"),
        ((str(finetuned), str(other), str(tmp_path / "b"), "--rank", "4"), "FINETUNED must be a fine-tune of BASE"),
        ((str(finetuned), "org/no-such-model", str(tmp_path / "c"), "--rank", "4"),
         "org/no-such-model: no such model on the Hub"),
        ((str(finetuned), str(base), str(tmp_path / "out"), "--rank", "4"), "already exists"),
    ]:
        done = cli(*args)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2 and len(errors) == 1 and message in errors[0], (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert cli(str(finetuned), str(base), str(tmp_path / "d"), "--rank", "0").returncode == 2  # argparse's own
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_extraction_from_the_hub(pair, hub, tmp_path):
    finetuned, base, state = pair
    hub.add_repo("org/ft", finetuned)
    hub.add_repo("org/base", base)
    plan = plan_extraction("org/ft", "org/base", 3, modules=("v_proj",), cache_dir=tmp_path / "cache")
    run_extraction(plan, tmp_path / "adapter", cache_dir=tmp_path / "cache")
    card = yaml.safe_load((tmp_path / "adapter" / "README.md").read_text().split("---")[1])
    assert card["base_model"] == "org/base"
    with pytest.raises(MergeError, match="no such model"):
        plan_extraction("org/ft", "org/missing", 3)


def test_a_full_disk_is_refused_before_downloading(pair, hub, tmp_path, monkeypatch):
    import shutil

    finetuned, base, _ = pair
    hub.add_repo("org/ft-big", finetuned)
    hub.add_repo("org/base-big", base)
    plan = plan_extraction("org/ft-big", "org/base-big", 3, cache_dir=tmp_path / "cache")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    with pytest.raises(MergeError, match="disk: the extraction needs .* on the disk holding"):
        run_extraction(plan, tmp_path / "adapter", cache_dir=tmp_path / "cache")
    assert not hub.downloaded("org/ft-big") - {"config.json"} and not (tmp_path / "adapter").exists()
