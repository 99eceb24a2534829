"""Mixtures of experts from mergekit-moe configs: parity with mergekit-moe 0.1.5, outputs that
transformers loads, routers computed one layer at a time, and one-line refusals of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from golden.make_moe_golden import write_models
from safetensors.torch import load_file
from tiny_models import load_state

from merging import MergeError, MergeOptions, parse_config, plan_merge, run_merge, summarize
from merging.moe import routers

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = yaml.safe_load((GOLDEN / "moe_cases.yml").read_text())
MIXTRAL = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe-models")
    write_models(root, load_file(str(GOLDEN / "moe_inputs.safetensors")),
                 json.loads((GOLDEN / "moe_inputs.json").read_text()))
    return root


def case_text(case: str, models: Path, **changes) -> str:
    return yaml.safe_dump({**CASES[case], **changes}).replace("MODELS/", f"{models}/")


def expert_name(config: dict, layer: int, expert: int, projection: str) -> str:
    if config["model_type"] == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{MIXTRAL[projection]}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_mergekit_moe(case, moe_models, tmp_path):
    run_merge(parse_config(case_text(case, moe_models)), tmp_path / "out")
    ours = load_state(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    spec = CASES[case]
    dtype = getattr(torch, spec["dtype"])

    for name, want in load_file(str(GOLDEN / f"moe_{case}.safetensors")).items():
        ours_name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.") if config["model_type"] == "mixtral" else name
        assert ours[ours_name].dtype == want.dtype, name
        torch.testing.assert_close(ours[ours_name], want, rtol=1e-2, atol=1e-6)  # bfloat16's own tolerance

    # every expert tensor is its source's, bit for bit (scaled where residual_scale says so)
    for e, expert in enumerate(spec["experts"]):
        source = load_state(moe_models / expert["source_model"].removeprefix("MODELS/"))
        for layer in range(3):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                want = source[f"model.layers.{layer}.mlp.{projection}.weight"].to(dtype)
                assert torch.equal(ours[expert_name(config, layer, e, projection)], want)
    for expert in spec.get("shared_experts", []):
        source = load_state(moe_models / expert["source_model"].removeprefix("MODELS/"))
        down = source["model.layers.1.mlp.down_proj.weight"] * expert.get("residual_scale", 1.0)
        assert torch.equal(ours["model.layers.1.mlp.shared_expert.down_proj.weight"], down.to(dtype))

    expected = json.loads((GOLDEN / "moe_configs.json").read_text())[case]
    if config["model_type"] == "qwen3_moe":  # both spellings of the expert count, for every reader
        assert config.pop("num_experts") == expected["num_local_experts"]
    assert config == expected


def test_the_mixture_loads_in_transformers_and_generates(moe_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for case in ("mixtral_hidden", "qwen2_moe_shared", "qwen3_moe_hidden"):
        run_merge(parse_config(case_text(case, moe_models)), tmp_path / case)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / case)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / case)
        assert type(model).__name__ == {"mixtral_hidden": "MixtralForCausalLM", "qwen2_moe_shared": "Qwen2MoeForCausalLM",
                                        "qwen3_moe_hidden": "Qwen3MoeForCausalLM"}[case]
        ids = tokenizer("<s> w1 w2 w3", return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 8)
        card = (tmp_path / case / "README.md").read_text()
        meta = yaml.safe_load(card.split("---")[1])
        assert meta["base_model_relation"] == "merge" and "moe" in meta["tags"]
        assert (tmp_path / case / "mergekit_moe_config.yml").read_text().strip() == \
            case_text(case, moe_models).strip()


def test_a_shared_expert_of_its_own_where_mergekit_moe_crashes(moe_models, tmp_path):
    spec = CASES["qwen2_moe_shared"]
    shared = [{**spec["shared_experts"][0], "source_model": "MODELS/qwen2-ft3"}]
    run_merge(parse_config(case_text("qwen2_moe_shared", moe_models, shared_experts=shared)), tmp_path / "out")
    ours = load_state(tmp_path / "out")
    source = load_state(moe_models / "qwen2-ft3")
    assert torch.equal(ours["model.layers.2.mlp.shared_expert.up_proj.weight"],
                       source["model.layers.2.mlp.up_proj.weight"].to(torch.bfloat16))
    assert ours["model.layers.2.mlp.shared_expert_gate.weight"].shape == (1, 32)
    # a Llama base gets the zero attention biases Qwen2-MoE always has
    llama = dict(CASES["mixtral_hidden"], architecture="qwen2_moe", shared_experts=shared[:0] + [
        {"source_model": "MODELS/llama-ft3", "positive_prompts": ["w9"]}])
    run_merge(parse_config(yaml.safe_dump(llama).replace("MODELS/", f"{moe_models}/")), tmp_path / "llama")
    merged = load_state(tmp_path / "llama")
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.bias"], torch.zeros(16, dtype=torch.bfloat16))


def test_random_routers_follow_the_seed(moe_models, tmp_path):
    text = case_text("mixtral_hidden", moe_models, gate_mode="random")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run_merge(parse_config(text), tmp_path / name, options=MergeOptions(seed=seed))
    a, b, c = (load_state(tmp_path / n)["model.layers.1.block_sparse_moe.gate.weight"] for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)
    uniform = case_text("mixtral_hidden", moe_models, gate_mode="uniform_random")
    run_merge(parse_config(uniform), tmp_path / "u")
    gate = load_state(tmp_path / "u")["model.layers.0.block_sparse_moe.gate.weight"].float()
    assert gate.abs().max() <= 32 ** -0.5 and gate.std() > 0.05


def test_noise_scale_adds_seeded_noise_then_residual_scale_scales(moe_models, tmp_path):
    spec = CASES["mixtral_hidden"]
    experts = [dict(spec["experts"][0], noise_scale=0.01, residual_scale=2.0), *spec["experts"][1:]]
    text = case_text("mixtral_hidden", moe_models, experts=experts, dtype="float32")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_merge(parse_config(text), tmp_path / name, options=MergeOptions(seed=seed))
    a, b, c = (load_state(tmp_path / n) for n in "abc")
    source = load_state(moe_models / "llama-ft1")
    down, up = "model.layers.1.block_sparse_moe.experts.0.w2.weight", "model.layers.1.block_sparse_moe.experts.0.w3.weight"
    assert torch.equal(a[down], b[down]) and not torch.equal(a[down], c[down])
    noise = a[up] - source["model.layers.1.mlp.up_proj.weight"]  # up_proj: noise, no residual scale
    assert 0.007 < float(noise.std()) < 0.013
    torch.testing.assert_close(a[down] / 2.0 - source["model.layers.1.mlp.down_proj.weight"],
                               torch.zeros_like(a[down]), rtol=0, atol=0.06)  # (W + noise) * 2
    assert torch.equal(a["model.layers.1.block_sparse_moe.experts.1.w1.weight"],
                       load_state(moe_models / "llama-ft2")["model.layers.1.mlp.gate_proj.weight"])


def test_hidden_routers_hold_one_layer_at_a_time(moe_models, monkeypatch):
    """Whenever a layer runs on real weights, it is the only layer off the meta device."""
    calls: list[tuple[bool, int]] = []  # (the running layer has real weights, layers with real weights)
    skeleton = routers._skeleton

    def hooked_skeleton(base):
        model = skeleton(base)
        layers = model.get_submodule("model.layers")

        def count(layer, args, kwargs):
            real = [any(p.device.type != "meta" for p in each.parameters()) for each in layers]
            calls.append((real[list(layers).index(layer)], sum(real)))

        for layer in layers:
            layer.register_forward_pre_hook(count, with_kwargs=True)
        return model

    monkeypatch.setattr(routers, "_skeleton", hooked_skeleton)
    plan = plan_merge(parse_config(case_text("mixtral_hidden", moe_models)))
    for source in plan.models:
        source.local_dir = Path(str(source.ref))
    weights = routers.router_weights(plan.config, plan.reference)
    assert weights.shape == (3, 3, 32)
    running = [real for own, real in calls if own]
    assert running == [1] * (3 * 4)  # 3 layers x 4 prompt groups (3 positive, 1 negative), one layer each
    assert max(real for _, real in calls) == 1


def test_dry_run_reports_the_mixture(moe_models, tmp_path):
    config = tmp_path / "moe.yml"
    config.write_text(case_text("qwen2_moe_shared", moe_models))
    done = subprocess.run([sys.executable, "-m", "merging", str(config), str(tmp_path / "out"), "--dry-run"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "output: Qwen2MoeForCausalLM, 2 experts and 1 shared, 2 per token" in done.stdout
    assert "routers: hidden from 6 prompts" in done.stdout
    assert not (tmp_path / "out").exists()
    summary = summarize(plan_merge(parse_config(config.read_text())))
    # per layer: 2 experts x 3 projections, the shared expert's 3, 2 routers, attention (4 weights, 3 biases),
    # 2 norms; then the (tied) embedding and the final norm
    assert summary.tensors == 3 * (6 + 3 + 2 + 7 + 2) + 2


def _bad(moe_models: Path, case: str = "mixtral_hidden", **changes) -> str:
    return case_text(case, moe_models, **changes)


@pytest.mark.parametrize("change, message", [
    ({"expert_per_token": 2}, "expert_per_token: unknown key (did you mean 'experts_per_token'?)"),
    ({"experts_per_token": 4}, "experts_per_token: must be a whole number from 1 to the 3 experts, got 4"),
    ({"gate_mode": "hiden"}, "gate_mode: unknown mode 'hiden' (did you mean 'hidden'?)"),
    ({"architecture": "deepseek"}, "architecture: DeepSeek MoE outputs are not supported"),
    ({"experts": [{"source_model": "MODELS/llama-ft1"}, {"source_model": "MODELS/llama-ft2",
                                                         "positive_prompts": ["w1"]}]},
     "experts[0].positive_prompts: required with gate_mode hidden"),
    ({"experts": [{"source_model": "MODELS/llama-ft1", "positive_prompts": ["w1"]},
                  {"source_model": "MODELS/llama-ft2", "positive_prompts": ["w1"]}]},
     "experts: every expert has the same prompts"),
    ({"experts": [{"source_model": "MODELS/llama-ft1", "positive_prompts": ["w1"]},
                  {"source_model": "MODELS/llama-ft1", "positive_prompts": ["w2"]}]},
     "experts: every expert is "),
    ({"shared_experts": [{"source_model": "MODELS/llama-ft3"}]},
     "shared_experts[0].positive_prompts: required with gate_mode hidden"),
    ({"experts": [{"source_model": "MODELS/llama-ft1", "positive_prompts": ["w1"], "noise": 0.1},
                  {"source_model": "MODELS/llama-ft2", "positive_prompts": ["w2"]}]},
     "experts[0].noise: unknown key (did you mean 'noise_scale'?)"),
])
def test_bad_configs_are_one_line(change, message, moe_models):
    with pytest.raises(MergeError) as raised:
        parse_config(_bad(moe_models, **change))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_bad_models_are_refused_before_any_download(moe_models, tmp_path):
    # an expert of another architecture
    mixed = dict(CASES["mixtral_hidden"])
    mixed["experts"] = [*mixed["experts"][:2], {"source_model": "MODELS/qwen2-ft1", "positive_prompts": ["w3"]}]
    cases = {
        "mixed": (yaml.safe_dump(mixed), "experts[2].source_model: ", "is a qwen2 model and base_model"),
        "shared on mixtral": (_bad(moe_models, architecture="mixtral", shared_experts=[
            {"source_model": "MODELS/llama-ft3", "positive_prompts": ["w5"]}]),
            "shared_experts: mixtral takes no shared experts, got 1", ""),
        "qwen3 from llama": (_bad(moe_models, architecture="qwen3_moe"),
                             "a qwen3_moe output is built from qwen3 models", ""),
    }
    gemma = tmp_path / "gemma-base"
    shutil.copytree(moe_models / "llama-base", gemma)
    (gemma / "config.json").write_text(json.dumps({**json.loads((gemma / "config.json").read_text()),
                                                   "model_type": "gemma"}))
    cases["gemma base"] = (_bad(moe_models, base_model=str(gemma)), "base_model: ", "is a gemma model; mixtures of "
                           "experts are built from llama, mistral, qwen2, qwen3 models")
    for name, (text, message, detail) in cases.items():
        with pytest.raises(MergeError) as raised:
            plan_merge(parse_config(text.replace("MODELS/", f"{moe_models}/")))
        assert message in str(raised.value) and detail in str(raised.value), name

    # an expert that is a mixture already, and one whose MLP is wider than the base's
    run_merge(parse_config(_bad(moe_models)), tmp_path / "moe")
    nested = dict(CASES["mixtral_hidden"])
    nested["experts"] = [*nested["experts"][:2], {"source_model": str(tmp_path / "moe"), "positive_prompts": ["w3"]}]
    with pytest.raises(MergeError, match=r"experts\[2\].source_model: .* is already a mixture of experts"):
        plan_merge(parse_config(yaml.safe_dump(nested).replace("MODELS/", f"{moe_models}/")))
    wide = tmp_path / "wide"
    wide.mkdir()
    state = load_state(moe_models / "llama-ft3")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 32)
    from safetensors.torch import save_file
    save_file(state, str(wide / "model.safetensors"))
    (wide / "config.json").write_text((moe_models / "llama-ft3" / "config.json").read_text())
    nested["experts"][2]["source_model"] = str(wide)
    with pytest.raises(MergeError, match=r"model.layers.1.mlp.up_proj.weight is \[64, 32\] in .* and \[48, 32\]"):
        plan_merge(parse_config(yaml.safe_dump(nested).replace("MODELS/", f"{moe_models}/")))


def test_cli_refusals_exit_2_and_leave_nothing(moe_models, tmp_path, hub):
    text = _bad(moe_models).replace(f"{moe_models}/llama-ft3", "org/missing-expert")
    config = tmp_path / "moe.yml"
    config.write_text(text)
    done = subprocess.run([sys.executable, "-m", "merging", str(config), str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env={**os.environ, "HF_ENDPOINT": hub.endpoint})
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "org/missing-expert: no such model on the Hub" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_experts_from_the_hub_download_only_what_they_need(moe_models, hub, tmp_path):
    for name in ("llama-base", "llama-ft1", "llama-ft2"):
        hub.add_repo(f"org/{name}", moe_models / name)
    spec = dict(CASES["mixtral_hidden"], base_model="org/llama-base")
    spec["experts"] = [dict(e, source_model=f"org/{m}") for e, m in zip(spec["experts"], ("llama-ft1", "llama-ft2"))]
    run_merge(parse_config(yaml.safe_dump(spec)), tmp_path / "out", cache_dir=tmp_path / "cache")
    assert {"model.safetensors", "tokenizer.json"} <= hub.downloaded("org/llama-base")
    merged = load_state(tmp_path / "out")
    assert torch.equal(merged["model.layers.2.block_sparse_moe.experts.1.w3.weight"],
                       load_state(moe_models / "llama-ft2")["model.layers.2.mlp.up_proj.weight"].to(torch.bfloat16))
    meta = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---")[1])
    assert meta["base_model"] == ["org/llama-base", "org/llama-ft1", "org/llama-ft2"]
