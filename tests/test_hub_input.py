"""Hub inputs through the loopback fake Hub and the real huggingface_hub client."""

from __future__ import annotations

import pytest
import torch
import yaml
from tiny_models import load_state

from merging import MergeError, parse_config, plan_merge, run_merge, summarize


@pytest.fixture(scope="module")
def hub_family(hub, llama, tmp_path_factory):
    repos = {
        "org/base": llama._write("hub-base", llama.base_state, shards=3, card="---\nlicense: mit\n---\n"),
        "org/ft1": llama.finetune(11, shards=3),
        "org/gated": llama.finetune(12),
    }
    hub.add_repo("org/base", repos["org/base"], card_data={"license": "mit"})
    hub.add_repo("org/ft1", repos["org/ft1"], card_data={"license": "mit"})
    hub.add_repo("org/gated", repos["org/gated"], gated=True)
    return repos


SLERP = """
merge_method: slerp
base_model: org/base
slices:
  - sources:
      - model: org/base
        layer_range: [0, 4]
      - model: org/ft1
        layer_range: [0, 4]
parameters:
  t: 0.3
"""


def test_merge_from_hub_repos(hub, hub_family, tmp_path):
    run_merge(parse_config(SLERP), tmp_path / "out", cache_dir=tmp_path / "cache")
    merged = load_state(tmp_path / "out")
    base, ft = load_state(hub_family["org/base"]), load_state(hub_family["org/ft1"])
    from merging.methods.spherical import slerp_pair
    name = "model.layers.2.mlp.gate_proj.weight"
    torch.testing.assert_close(merged[name], slerp_pair(0.3, base[name], ft[name]))
    card = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == ["org/base", "org/ft1"] and meta["license"] == "mit"
    assert "using [org/base](https://huggingface.co/org/base) as a base" in card


def test_hub_dry_run_reads_headers_only(hub, hub_family, tmp_path):
    plan = plan_merge(parse_config(SLERP), cache_dir=tmp_path / "cache")
    summary = summarize(plan)
    weights = {f: (hub_family["org/base"] / f).stat().st_size for f in
               ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors")}
    assert summary.download_bytes == 2 * sum(weights.values())
    full_gets = [p for m, p in hub.requests if m == "GET" and p.endswith(".safetensors")]
    assert full_gets == []  # only Range requests for headers
    assert any(p.endswith(".safetensors range") for _, p in hub.requests)


def test_only_shards_holding_needed_layers_are_downloaded(hub, hub_family, tmp_path):
    text = "merge_method: passthrough\nslices:\n  - sources: [{model: org/ft1, layer_range: [3, 4]}]\n"
    plan = plan_merge(parse_config(text), cache_dir=tmp_path / "cache")
    needed = plan.needed_files()[0]
    assert len(needed) < 3
    run_merge(parse_config(text), tmp_path / "out", cache_dir=tmp_path / "cache2")
    downloaded = {f for f in hub.downloaded("org/ft1") if f.endswith(".safetensors")}
    assert downloaded == needed
    assert load_state(tmp_path / "out")["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)


def test_gated_and_missing_repos_give_one_line_errors(hub, hub_family, tmp_path):
    gated = SLERP.replace("org/ft1", "org/gated")
    with pytest.raises(MergeError, match=r"^org/gated: the repo is gated; accept its terms"):
        plan_merge(parse_config(gated), cache_dir=tmp_path / "cache")
    missing = SLERP.replace("org/ft1", "org/nope")
    with pytest.raises(MergeError, match=r"^org/nope: no such model on the Hub"):
        plan_merge(parse_config(missing), cache_dir=tmp_path / "cache")


def test_token_opens_gated_repo(hub, hub_family, tmp_path):
    hub.token = "hf_secret_value"
    gated = SLERP.replace("org/ft1", "org/gated")
    run_merge(parse_config(gated), tmp_path / "out", token="hf_secret_value", cache_dir=tmp_path / "cache")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"hf_secret_value" not in path.read_bytes()


def test_revisions_resolve_to_a_commit(hub, hub_family, tmp_path):
    hub.repos["org/ft1"].refs.add("v1")
    plan = plan_merge(parse_config(SLERP.replace("model: org/ft1", "model: org/ft1@v1")), cache_dir=tmp_path / "c")
    assert plan.models[1].commit == hub.repos["org/ft1"].sha
    with pytest.raises(MergeError, match=r"^org/ft1@v9: revision 'v9' does not exist on the Hub$"):
        plan_merge(parse_config(SLERP.replace("model: org/ft1", "model: org/ft1@v9")), cache_dir=tmp_path / "c")
