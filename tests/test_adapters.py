"""LoRA adapters as merge inputs (`model+adapter`): applied while streaming, equal to peft's merge_and_unload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import load_state

from merging import MergeError, MergeOptions, parse_config, plan_merge, run_merge
from merging.__main__ import main

GOLDEN = Path(__file__).resolve().parent / "golden"


def _adapter(llama, folder, *, seed: int, **lora) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter on the tiny Llama base saved to `folder`; returns what peft's
    merge_and_unload makes of base + adapter."""
    from golden.make_lora_golden import make_adapter

    merged = make_adapter(llama.base(), folder, seed, **lora).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


CASES = {
    "attention": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora-patterns": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "down_proj", "up_proj"],
                            rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 4}),
    "embeddings-head-saved": dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "o_proj"],
                                  modules_to_save=["model.norm"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_adapter_applied_while_streaming_equals_peft_merge_and_unload(case, llama, tmp_path):
    want = _adapter(llama, tmp_path / "adapter", seed=len(case), **CASES[case])
    text = f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {llama.base()}+{tmp_path / 'adapter'}\n        layer_range: [0, 4]\n"
    run_merge(parse_config(text), tmp_path / "out", options=MergeOptions(chunk_elements=64))  # row chunks too
    got = load_state(tmp_path / "out")
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


LORA_CASES = yaml.safe_load((GOLDEN / "lora_cases.yml").read_text())


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_model_plus_lora_matches_mergekit(case, tmp_path):
    """`model+lora` as mergekit 0.1.5 merges it (through peft), on the golden models."""
    from golden.make_lora_golden import write_models

    write_models(tmp_path / "models")
    text = yaml.safe_dump(LORA_CASES[case]).replace("ADAPTERS/", f"{GOLDEN}/").replace("MODELS/",
                                                                                        f"{tmp_path / 'models'}/")
    run_merge(parse_config(text), tmp_path / "out")
    got, want = load_state(tmp_path / "out"), load_file(str(GOLDEN / f"lora_{case}.safetensors"))
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def test_adapters_merge_with_other_models_and_come_from_the_hub(llama, hub, tmp_path):
    want = _adapter(llama, tmp_path / "adapter", seed=7, **CASES["attention"])
    hub.add_repo("ada/lora", tmp_path / "adapter")
    base, ft = llama.base(), llama.finetune(1)
    text = (f"merge_method: linear\nmodels:\n  - {{model: {base}+ada/lora, parameters: {{weight: 0.5}}}}\n"
            f"  - {{model: {ft}, parameters: {{weight: 0.5}}}}\n")
    plan = plan_merge(parse_config(text), cache_dir=tmp_path / "cache")
    assert plan.download_bytes == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert not hub.downloaded("ada/lora") - {"adapter_config.json"}  # the dry run reads headers only
    run_merge(parse_config(text), tmp_path / "out", cache_dir=tmp_path / "cache")
    got, other = load_state(tmp_path / "out"), load_state(ft)
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(got[name], 0.5 * want[name] + 0.5 * other[name], rtol=1e-6, atol=1e-6)
    card = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---")[1])
    assert "ada/lora" in card["base_model"]


def test_adapters_that_cannot_be_applied_exactly_are_one_line(llama, tmp_path, capsys):
    adapter = tmp_path / "lora"
    _adapter(llama, adapter, seed=1, **CASES["attention"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    for name, change, message in [
        ("dora", {"use_dora": True}, "DoRA adapters are not supported"),
        ("loha", {"peft_type": "LOHA"}, "LOHA adapters are not supported"),
    ]:
        folder = tmp_path / name
        shutil.copytree(adapter, folder, dirs_exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
        path = tmp_path / f"{name}.yml"
        path.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {llama.base()}+{folder}\n"
                        f"        layer_range: [0, 4]\n")
        assert main([str(path), str(tmp_path / f"out-{name}"), "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(MergeError, match="not a PEFT adapter"):
        plan_merge(parse_config(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: "
                                f"{llama.base()}+{llama.finetune(1)}\n        layer_range: [0, 4]\n"))
    with pytest.raises(MergeError, match="the base does not match"):
        plan_merge(parse_config(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: "
                                f"{llama_other(llama, tmp_path)}+{adapter}\n        layer_range: [0, 4]\n"))


def llama_other(llama, tmp_path):
    """A Llama of other widths: the adapter's shapes do not fit it."""
    from tiny_models import Family

    return Family(tmp_path / "wider", "llama", layers=4, hidden=64).base()


def test_a_bare_adapter_repo_means_that_adapter_on_its_base(llama, hub, tmp_path, caplog):
    want = _adapter(llama, tmp_path / "adapter", seed=11, **CASES["attention"])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    hub.add_repo("ada/base", llama.base())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "ada/base"}))
    hub.add_repo("ada/bare", tmp_path / "adapter")
    text = "merge_method: passthrough\nslices:\n  - sources:\n      - model: ada/bare\n        layer_range: [0, 4]\n"
    run_merge(parse_config(text), tmp_path / "out", cache_dir=tmp_path / "cache")
    got = load_state(tmp_path / "out")
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    card = (tmp_path / "out" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == ["ada/base", "ada/bare"]
    assert "ada/bare is a LoRA adapter: merged as ada/base+ada/bare" in card and "merged as ada/base+ada/bare" in caplog.text

    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/etc"}))
    hub.add_repo("ada/sneaky", tmp_path / "adapter")
    with pytest.raises(MergeError, match="local paths are not allowed here"):
        plan_merge(parse_config(text.replace("ada/bare", "ada/sneaky")), cache_dir=tmp_path / "cache")
