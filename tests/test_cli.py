"""The command line: exit codes, one-line errors, nothing left behind, dry run, seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TIES_CONFIG, load_state

from merging.__main__ import main
from merging.safetensors_io import TensorReader

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merging", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


@pytest.fixture(scope="module")
def paths(llama):
    return {"base": llama.base(), "ft1": llama.finetune(1), "ft2": llama.finetune(2)}


def write(tmp_path, text: str, **paths) -> Path:
    config = tmp_path / "config.yml"
    config.write_text(text.format(**paths))
    return config


GOOD_TIES = TIES_CONFIG

BAD_CONFIGS = [
    ("typo_param", GOOD_TIES.replace("density: 0.5}}\n  - model: {ft2}", "densty: 0.5}}\n  - model: {ft2}"),
     "models[0].parameters.densty: ties has no parameter 'densty' (did you mean 'density'?)"),
    ("unknown_top_key", GOOD_TIES + "merge_methd: ties\n", "merge_methd: unknown key (did you mean 'merge_method'?)"),
    ("unknown_method", GOOD_TIES.replace("merge_method: ties", "merge_method: tie"),
     "merge_method: unknown method 'tie' (did you mean 'ties'?)"),
    ("missing_weight", GOOD_TIES.replace("weight: 0.5, ", ""),
     "weight is required for this method and has no value"),
    ("wrong_type", GOOD_TIES.replace("density: 0.5}}\n  - model: {ft2}", "density: lots}}\n  - model: {ft2}"),
     "models[0].parameters.density: density must be a number, got 'lots'"),
    ("no_base", GOOD_TIES.replace("base_model: {base}\n", ""), "base_model: ties needs a base_model"),
    ("slerp_three", "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{t: 0.5}}\n",
     "models: slerp takes exactly 1 model besides the base, got 2"),
    ("range_out_of_bounds", "merge_method: passthrough\nslices:\n  - sources: [{{model: {ft1}, layer_range: [0, 9]}}]\n",
     "slices[0].sources[0].layer_range: [0, 9] exceeds the 4 layers of"),
    ("unequal_slice", "merge_method: slerp\nbase_model: {base}\nslices:\n  - sources:\n    - {{model: {base}, layer_range: [0, 4]}}\n    - {{model: {ft1}, layer_range: [0, 3]}}\nparameters: {{t: 0.5}}\n",
     "slices[0].sources: every source of a slice needs the same number of layers"),
    ("lora_without_adapter", GOOD_TIES.replace("model: {ft1}", "model: org/model+"), "is not 'model+adapter' (one model, one LoRA adapter)"),
    ("bad_template", GOOD_TIES + "chat_template: \"{{% if %}}\"\n", "chat_template: the Jinja template does not compile"),
    ("bad_yaml", "merge_method: ties\nmodels: [\n", "config: the YAML does not parse at line"),
    ("missing_dir", GOOD_TIES.replace("model: {ft1}", "model: ./no/such/dir"), "is neither an existing local directory nor a Hub repo id"),
    ("bad_dtype", GOOD_TIES + "dtype: bfloat61\n", "dtype: unknown dtype 'bfloat61' (did you mean 'bfloat16'?)"),
    ("both_models_and_slices", GOOD_TIES + "slices: []\n", "models/slices: give exactly one of"),
]


@pytest.mark.parametrize("name, text, message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_gives_one_line_and_leaves_nothing(name, text, message, paths, tmp_path, capsys):
    config = write(tmp_path, text, **paths)
    out = tmp_path / "out"
    code = main([str(config), str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["config.yml"]


def test_mixed_architectures_are_refused(paths, qwen2, tmp_path, capsys):
    config = write(tmp_path, "merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 1}}}}\n"
                   "  - {{model: {b}, parameters: {{weight: 1}}}}\n", a=paths["base"], b=qwen2.base())
    assert main([str(config), str(tmp_path / "out")]) == 2
    assert "inputs mix architectures" in capsys.readouterr().err


def test_cli_merges_and_refuses_an_existing_output(paths, tmp_path):
    config = write(tmp_path, GOOD_TIES, **paths)
    done = cli(config, tmp_path / "out", "--quiet")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    again = cli(config, tmp_path / "out")
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_seed_makes_randomized_methods_reproducible(paths, tmp_path):
    config = write(tmp_path, GOOD_TIES.replace("merge_method: ties", "merge_method: dare_ties"), **paths)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main([str(config), str(tmp_path / name), "--seed", str(seed), "--quiet"]) == 0
    a, b, c = (load_state(tmp_path / n) for n in "abc")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


def test_dry_run_reports_sizes_without_reading_tensor_data(paths, tmp_path, capsys, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("dry run read tensor data")

    monkeypatch.setattr(TensorReader, "read", no_reads)
    config = write(tmp_path, GOOD_TIES.replace("models:", "dtype: bfloat16\nmodels:"), **paths)
    assert main([str(config), str(tmp_path / "out"), "--dry-run"]) == 0
    report = capsys.readouterr().out
    base = load_state(paths["base"])
    params = sum(t.numel() for t in base.values())
    assert f"tensors to write: {len(base)}" in report
    assert f"output parameters: {params:,} ({params * 2 / 1000:.2f} KB)" in report
    assert "to download: 0 B" in report and "estimated peak memory:" in report
    assert not (tmp_path / "out").exists()


def test_out_shard_size_flag(paths, tmp_path):
    config = write(tmp_path, GOOD_TIES, **paths)
    assert main([str(config), str(tmp_path / "out"), "--out-shard-size", "50KB", "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1


def test_workers_flag_changes_nothing_but_the_threads(paths, tmp_path, capsys):
    config = write(tmp_path, GOOD_TIES.replace("merge_method: ties", "merge_method: dare_ties"), **paths)
    for name, workers in (("inline", "0"), ("threads", "3")):
        assert main([str(config), str(tmp_path / name), "--workers", workers, "--quiet"]) == 0
    inline, threads = load_state(tmp_path / "inline"), load_state(tmp_path / "threads")
    assert all(torch.equal(inline[k], threads[k]) for k in inline)
    with pytest.raises(SystemExit):
        main([str(config), str(tmp_path / "bad"), "--workers", "-1"])
    assert "not a number of threads" in capsys.readouterr().err


def test_help_shows_defaults_without_loading_torch():
    check = ("import sys, contextlib, io; from merging.__main__ import main; out = io.StringIO()\n"
             "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit): main(['--help'])\n"
             "print('torch' in sys.modules, '(default: 5GB)' in out.getvalue())")
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "True"], done.stderr


def test_the_offline_demo_runs_from_the_command_line(tmp_path):
    made = subprocess.run([sys.executable, "-m", "merging.demo", str(tmp_path / "demo")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    configs = [tmp_path / "demo" / "demo.yml", tmp_path / "demo" / "demo-moe.yml"]
    assert made.returncode == 0 and made.stdout.split() == [str(c) for c in configs]
    for config in configs:
        done = cli(config, tmp_path / "out" / config.stem, "--quiet")
        assert done.returncode == 0 and (tmp_path / "out" / config.stem / "model.safetensors").is_file(), done.stderr
    assert json.loads((tmp_path / "out" / "demo-moe" / "config.json").read_text())["num_local_experts"] == 2
