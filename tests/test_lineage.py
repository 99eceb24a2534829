"""Lineage against the loopback fake Hub through the real huggingface_hub client."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import networkx as nx
import pytest
import yaml

from lineage import (
    CrawlOptions,
    HubSource,
    RecordingSource,
    SnapshotSource,
    build_lineage,
    composition,
    render_html,
    roots,
    to_graphml,
    to_json,
    to_mermaid,
)
from lineage.__main__ import main as lineage_main
from lineage.fetch import DiskCache


def card(meta: dict | None = None, body: str = "", raw_meta: str | None = None) -> str:
    head = raw_meta if raw_meta is not None else (yaml.safe_dump(meta) if meta else "")
    return f"---\n{head}---\n{body}\n" if head else body


MERGE1_CONFIG = """
slices:
  - sources:
      - {model: org/ft-a, layer_range: [0, 32]}
      - {model: org/ft-b, layer_range: [0, 32]}
merge_method: slerp
base_model: org/ft-a
parameters:
  t: 0.3
dtype: bfloat16
"""

MERGE2_BODY = """# merge2
A linear merge.

```yaml
models:
  - model: org/merge1
    parameters:
      weight: 0.75
  - model: org/ft-c
    parameters:
      weight: 0.25
merge_method: linear
```
Inspired by [org/famous](https://huggingface.co/org/famous). Quantized: [q](https://huggingface.co/org/merge2-GGUF).
"""

BROKEN_BODY = """# broken
This is a merge of pre-trained language models created using mergekit.
This model was merged using the TIES merge method using [org/base](https://huggingface.co/org/base) as a base.
The following models were included in the merge:
* [org/ft-a](https://huggingface.co/org/ft-a)
* [org/ft-b](https://huggingface.co/org/ft-b)

See also [org/famous](https://huggingface.co/org/famous).
"""

REPOS = {
    "org/base": dict(card=card({"license": "apache-2.0"}), downloads=1000),
    "org/base2": dict(card=card({"license": "mit"})),
    "org/base3": dict(card=card({"license": "cc-by-nc-4.0"})),
    "org/ft-a": dict(card=card({"base_model": "org/base", "base_model_relation": "finetune", "license": "apache-2.0"}),
                     tags=["base_model:org/base", "base_model:finetune:org/base"], downloads=50),
    "org/ft-b": dict(card=card({"base_model": "org/base2"}), tags=["base_model:org/base2"]),
    "org/ft-c": dict(card=card({"base_model": ["org/base3"], "license": "cc-by-nc-4.0"})),
    "org/merge1": dict(card=card({"license": "apache-2.0"}, "# merge1"), files={"mergekit_config.yml": MERGE1_CONFIG},
                       tags=["merge", "mergekit"]),
    "org/merge2": dict(card=card(None, MERGE2_BODY), likes=3),
    "org/loop-a": dict(card=card({"base_model": "org/loop-b"})),
    "org/loop-b": dict(card=card({"base_model": ["org/loop-a", "org/base"]})),
    "org/selfie": dict(card=card({"base_model": ["org/selfie", "org/base"]})),
    "org/broken": dict(card=card(raw_meta="license: [mit\nbase_model: {{{\n", body=BROKEN_BODY)),
    "org/orphan": dict(card=card({"base_model": "org/does-not-exist"})),
    "org/gated-base": dict(card=card({"license": "llama3"}), gated=True),
    "org/gated-child": dict(card=card({"base_model": "org/gated-base"})),
    "org/tagged": dict(card="# tagged\nno metadata\n", tags=["merge", "org/ft-a", "org/ft-b", "not/a-repo", "license:mit"]),
    "org/lora-merge": dict(card=card(None, "# lora"), files={"mergekit_config.yml": (
        "merge_method: linear\nmodels:\n  - model: org/ft-a+org/my-lora@abc123\n    parameters: {weight: 1.0}\n"
        "  - model: org/ft-b@v2\n    parameters: {weight: 1.0}\n")}),
    "org/xss": dict(card=card({"base_model": "org/base", "license": "<script>alert(1)</script>"}),
                    tags=["<script>alert('tag')</script>", "base_model:org/base"]),
}


@pytest.fixture(scope="module")
def family(hub, tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage-repos")
    for repo_id, spec in REPOS.items():
        directory = root / repo_id.replace("/", "__")
        directory.mkdir()
        (directory / "README.md").write_text(spec["card"])
        for name, text in spec.get("files", {}).items():
            (directory / name).write_text(text)
        meta = None
        if spec["card"].startswith("---\n"):
            try:
                meta = yaml.safe_load(spec["card"].split("---\n")[1])
            except yaml.YAMLError:
                meta = None  # the Hub leaves cardData empty when the YAML does not parse
        hub.add_repo(repo_id, directory, card_data=meta or {}, tags=spec.get("tags", []),
                     downloads=spec.get("downloads", 0), likes=spec.get("likes", 0), gated=spec.get("gated", False))
    return REPOS


def crawl(model_id: str, **options) -> nx.DiGraph:
    source = HubSource(sleep=lambda s: None)
    return build_lineage(model_id, source, CrawlOptions(**options))


def edges(graph: nx.DiGraph) -> set[tuple[str, str, str]]:
    return {(u, v, d["relation"]) for u, v, d in graph.edges(data=True)}


def test_merges_of_merges_edges_and_attributes(family):
    graph = crawl("org/merge2", depth=5)
    assert edges(graph) == {
        ("org/merge1", "org/merge2", "merge"), ("org/ft-c", "org/merge2", "merge"),
        ("org/ft-a", "org/merge1", "merge"), ("org/ft-b", "org/merge1", "merge"),
        ("org/base", "org/ft-a", "finetune"), ("org/base2", "org/ft-b", "finetune"),
        ("org/base3", "org/ft-c", "finetune"),
    }
    merge1 = graph.edges["org/ft-a", "org/merge1"]
    assert merge1["method"] == "slerp" and merge1["role"] == "base_model" and merge1["t"] == 0.3
    assert merge1["sources"] == ["mergekit_config"]
    assert graph.edges["org/merge1", "org/merge2"]["weight"] == 0.75
    assert graph.edges["org/merge1", "org/merge2"]["sources"] == ["mergekit_config"]  # README yaml block only
    assert graph.edges["org/base", "org/ft-a"]["sources"] == ["card_metadata", "hub_relation"]
    assert "org/famous" not in graph and "org/merge2-GGUF" not in graph  # prose links are not parents
    node = graph.nodes["org/base"]
    assert (node["license"], node["downloads"], node["generation"], node["status"]) == ("apache-2.0", 1000, -3, "ok")
    assert graph.nodes["org/merge2"]["likes"] == 3 and graph.nodes["org/merge2"]["generation"] == 0
    assert roots(graph) == ["org/base", "org/base2", "org/base3"]
    assert graph.graph["cycles"] == [] and graph.graph["truncated"] is False


def test_composition_by_hand(family):
    shares = composition(crawl("org/merge2", depth=5))
    # merge2 = 0.75 merge1 + 0.25 ft-c; merge1 = slerp(base ft-a, ft-b, t=0.3) = 0.7 ft-a + 0.3 ft-b
    assert shares == pytest.approx({"org/base": 0.525, "org/base3": 0.25, "org/base2": 0.225})


def test_cycles_are_kept_and_listed(family):
    graph = crawl("org/loop-a", depth=6)
    assert ("org/loop-b", "org/loop-a", "finetune") in edges(graph)
    assert ("org/loop-a", "org/loop-b", "merge") in edges(graph)
    assert graph.graph["cycles"] == [["org/loop-a", "org/loop-b"]]
    assert composition(graph) == {"org/base": 1.0}


def test_self_reference_is_dropped_with_a_note(family):
    graph = crawl("org/selfie")
    assert not graph.has_edge("org/selfie", "org/selfie")
    assert edges(graph) == {("org/base", "org/selfie", "merge")} or edges(graph) == {("org/base", "org/selfie", "finetune")}
    assert any("self-reference" in note for note in graph.nodes["org/selfie"]["notes"])


def test_broken_card_yaml_still_reads_the_mergekit_template(family):
    graph = crawl("org/broken", depth=1)
    assert graph.nodes["org/broken"]["card_status"] == "unparsable"
    assert {(u, r) for u, v, r in edges(graph) if v == "org/broken"} == {
        ("org/base", "merge"), ("org/ft-a", "merge"), ("org/ft-b", "merge")}
    assert graph.edges["org/base", "org/broken"]["role"] == "base_model"
    assert "org/famous" not in graph


def test_missing_and_gated_parents_become_marked_nodes(family):
    graph = crawl("org/orphan")
    assert graph.nodes["org/does-not-exist"]["status"] == "missing"
    assert ("org/does-not-exist", "org/orphan", "finetune") in edges(graph)
    graph = crawl("org/gated-child")
    assert graph.nodes["org/gated-base"]["status"] == "gated"
    assert graph.nodes["org/gated-base"]["license"] == "llama3"  # model info of a gated repo is public


def test_parents_only_in_tags(family):
    graph = crawl("org/tagged", depth=1)
    assert {(u, r) for u, v, r in edges(graph) if v == "org/tagged"} == {("org/ft-a", "merge"), ("org/ft-b", "merge")}
    assert "not/a-repo" not in graph


def test_lora_and_revision_references(family):
    graph = crawl("org/lora-merge", depth=1)
    assert {u for u, v in graph.in_edges("org/lora-merge")} == {"org/ft-a", "org/my-lora", "org/ft-b"}
    assert graph.edges["org/my-lora", "org/lora-merge"]["lora_of"] == "org/ft-a"
    assert graph.nodes["org/my-lora"]["status"] == "missing"


def test_injected_429s_give_the_fault_free_result(hub, family, tmp_path):
    clean = to_json(crawl("org/merge2", depth=5))
    hub.faults[r"^/api/models/org/merge1"] = [429, 429, 503]
    hub.faults[r"/org/ft-c/resolve/"] = [429]
    faulty = to_json(crawl("org/merge2", depth=5))
    assert hub.faults[r"^/api/models/org/merge1"] == [] and hub.faults[r"/org/ft-c/resolve/"] == []
    assert faulty == clean


def test_depth_and_node_caps_say_where_they_cut(family):
    shallow = crawl("org/merge2", depth=1)
    assert set(shallow) == {"org/merge2", "org/merge1", "org/ft-c"}
    assert shallow.graph["truncated"] and shallow.nodes["org/merge1"]["cut"] == "depth"
    capped = crawl("org/merge2", depth=5, max_nodes=4)
    assert capped.number_of_nodes() == 4 and capped.graph["truncated"]
    assert any(reason == "max_nodes" for _, reason in capped.nodes(data="cut"))


def test_descendants_through_hub_children(family):
    graph = crawl("org/base", direction="down", depth=1)
    assert ("org/base", "org/ft-a", "finetune") in edges(graph)
    assert ("org/base", "org/xss", "finetune") in edges(graph)
    assert "hub_children" in graph.edges["org/base", "org/ft-a"]["sources"]
    assert graph.nodes["org/ft-a"]["generation"] == 1


def test_card_text_never_reaches_the_html_unescaped(family):
    graph = crawl("org/xss", depth=1)
    page = render_html(graph)
    from lineage.render import _vis_assets

    assert "<script>alert" not in page
    assert page.replace(_vis_assets()[0], "").count("<script") == 2  # only our own two script tags
    # JSON-escaped inside the script; vis-network shows the tooltip as text (innerText), not markup
    assert "\\u003cscript\\u003ealert(1)" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing loads from outside
    assert "<link" not in page and "url(http" not in page


def test_exports(family, tmp_path):
    graph = crawl("org/merge2", depth=5)
    data = to_json(graph)
    link = next(e for e in data["edges"] if e["source"] == "org/merge1" and e["target"] == "org/merge2")
    assert link["relation"] == "merge" and link["weight"] == 0.75
    to_graphml(graph, tmp_path / "g.graphml")
    assert nx.read_graphml(tmp_path / "g.graphml").number_of_edges() == graph.number_of_edges()
    mermaid = to_mermaid(graph)
    assert mermaid.startswith("graph TD") and "-->|slerp|" in mermaid and '["org/merge2"]' in mermaid


def test_disk_cache_makes_a_second_look_instant(hub, family, tmp_path):
    cache = DiskCache(tmp_path / "cache")
    first = to_json(build_lineage("org/merge2", HubSource(cache=cache), CrawlOptions(depth=5)))
    hub.requests.clear()
    second = to_json(build_lineage("org/merge2", HubSource(cache=cache), CrawlOptions(depth=5)))
    assert second == first and hub.requests == []


def test_the_disk_cache_is_kept_apart_per_token_and_two_requests_read_a_model(hub, family, tmp_path):
    cache = DiskCache(tmp_path / "cache")
    build_lineage("org/merge2", HubSource(token=False, cache=cache), CrawlOptions(depth=5))
    models = [p for m, p in hub.requests if m == "GET" and p.startswith("/api/models/")]
    files = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert len(models) == len(set(models)) and len(files) == len(set(files))  # each asked once: info, then files
    hub.requests.clear()
    build_lineage("org/merge2", HubSource(token="hf_someone_else", cache=cache), CrawlOptions(depth=5))
    assert hub.requests  # another token's scope: nothing read from the anonymous entries
    assert not any("hf_someone_else" in path.read_text() for path in (tmp_path / "cache").iterdir())


def test_descendants_take_one_listing_per_model(hub, family):
    graph = crawl("org/base", direction="down", depth=2)
    listings = [p for m, p in hub.requests if p == "/api/models"]
    assert len(listings) == sum(1 for n, g in graph.nodes(data="generation") if g <= 2)


def test_snapshot_round_trip_and_cli(family, tmp_path, capsys):
    recorder = RecordingSource(HubSource())
    live = build_lineage("org/merge2", recorder, CrawlOptions(depth=5))
    recorder.save(tmp_path / "snap.json", target="org/merge2")
    offline = build_lineage("org/merge2", SnapshotSource(tmp_path / "snap.json"), CrawlOptions(depth=5))
    assert to_json(offline) == to_json(live)
    code = lineage_main(["org/merge2", "--snapshot", str(tmp_path / "snap.json"), "--json", str(tmp_path / "o.json"),
                         "--html", str(tmp_path / "o.html"), "--graphml", str(tmp_path / "o.graphml"),
                         "--mermaid", str(tmp_path / "o.mmd")])
    assert code == 0
    assert capsys.readouterr().out.startswith("org/merge2")
    code = lineage_main(["org/loop-a", "--snapshot", str(tmp_path / "snap.json")])
    err = capsys.readouterr().err  # loop-a was not part of the recorded crawl
    assert code == 2 and err == (f"error: MODEL_ID: org/loop-a is not in the snapshot {tmp_path / 'snap.json'}, "
                                 f"which holds only the family of org/merge2\n")
    code = lineage_main(["org/loop-a", "--depth", "3", "--save-snapshot", str(tmp_path / "loop.json"),
                         "--json", str(tmp_path / "loop-graph.json"), "--no-cache"])
    out = capsys.readouterr().out
    assert code == 0 and "cycles: 1" in out and "org/loop-a -> org/loop-b -> org/loop-a" in out
    assert json.loads((tmp_path / "loop-graph.json").read_text())["edges"]
    assert all((tmp_path / f).stat().st_size > 0 for f in ("o.json", "o.html", "o.graphml", "o.mmd"))


def test_demo_snapshot_is_the_neuralbeagle_family():
    from lineage.demo import DEMO_SNAPSHOT

    graph = build_lineage("mlabonne/NeuralBeagle14-7B", SnapshotSource(DEMO_SNAPSHOT),
                          CrawlOptions(direction="both", depth=8))
    assert graph.edges["mlabonne/Beagle14-7B", "mlabonne/NeuralBeagle14-7B"]["relation"] == "finetune"
    beagle = graph.edges["fblgit/UNA-TheBeagle-7b-v1", "mlabonne/Beagle14-7B"]
    assert beagle["method"] == "slerp" and beagle["t"][0]["filter"] == "self_attn"
    assert graph.edges["mlabonne/Marcoro14-7B-slerp", "argilla/distilabeled-Marcoro14-7B-slerp"]["sources"] == ["reported"]
    assert ("mlabonne/NeuralBeagle14-7B", "leveldevai/TurdusBeagle-7B") in graph.edges
    assert composition(graph)["fblgit/UNA-TheBeagle-7b-v1"] == pytest.approx(0.5)


def test_a_license_more_permissive_than_an_ancestors_is_flagged_everywhere(hub, tmp_path, capsys):
    from lineage import conflict_text, required_license

    cards = {"lic/nc-base": {"license": "cc-by-nc-4.0"}, "lic/llama-base": {"license": "llama3"},
             "lic/ft": {"base_model": "lic/nc-base", "license": "cc-by-nc-4.0"},
             "lic/merge": {"base_model": ["lic/ft", "lic/llama-base"], "license": "apache-2.0"},
             "lic/child": {"base_model": "lic/merge", "license": "mit"}}
    for repo_id, meta in cards.items():
        (tmp_path / repo_id).mkdir(parents=True)
        (tmp_path / repo_id / "README.md").write_text(f"---\n{yaml.safe_dump(meta)}---\n")
        hub.add_repo(repo_id, tmp_path / repo_id, card_data=meta)
    graph = crawl("lic/child", depth=4)
    merge = graph.nodes["lic/merge"]
    assert merge["license_family"] == "permissive"
    assert merge["license_conflict"] == {"ancestor": "lic/ft", "ancestor_license": "cc-by-nc-4.0",
                                         "path": ["lic/ft", "lic/merge"]}  # the nearest of the strictest
    assert graph.nodes["lic/child"]["license_conflict"]["path"] == ["lic/ft", "lic/merge", "lic/child"]
    assert "license_conflict" not in graph.nodes["lic/ft"]  # non-commercial like its base: no conflict
    assert conflict_text(merge) == ("apache-2.0 (permissive) is more permissive than cc-by-nc-4.0 (non-commercial) "
                                    "of ancestor lic/ft, via lic/ft -> lic/merge")
    assert "\\u26a0 lic/merge" in render_html(graph) and "license conflict" in render_html(graph)
    assert next(n for n in to_json(graph)["nodes"] if n["id"] == "lic/merge")["license_conflict"]["ancestor"] == "lic/ft"
    to_graphml(graph, tmp_path / "g.graphml")
    assert "license_conflict" in nx.read_graphml(tmp_path / "g.graphml").nodes["lic/merge"]

    assert lineage_main(["lic/child", "--depth", "4", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "license conflicts: 2" in out and "  lic/merge: apache-2.0 (permissive) is more permissive" in out
    assert required_license({"a/x": "apache-2.0", "b/y": "llama3", "c/z": None}) == (
        "license: the result must carry terms at least as restrictive as llama3 (custom, from b/y); unknown for c/z")


def test_validate_says_which_license_a_merge_must_carry(mergeline_app):
    from app import DEMO_EXAMPLE

    report, _ = mergeline_app.validate(mergeline_app.example_config(DEMO_EXAMPLE))
    assert "license: the result must carry terms at least as restrictive as apache-2.0 (permissive" in report


@pytest.fixture(scope="module")
def weighed_family(hub, llama, tmp_path_factory):
    """Cards that tell the truth and cards that lie, over real (tiny) weights on the fake Hub."""
    import torch
    from tiny_models import Family

    from merging import parse_config, run_merge

    root = tmp_path_factory.mktemp("weighed")
    stranger = Family(root / "stranger", "llama", layers=4, hidden=32)
    stranger.base_state = {k: torch.randn_like(v) for k, v in stranger.base_state.items()}  # another model entirely
    base, ft, ft2 = llama.base(), llama.finetune(31), llama.finetune(32)

    def merged(name: str, text: str) -> Path:
        out = root / name
        run_merge(parse_config(text), out)
        return out

    linear = "merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: {w}}}}}\n  - {{model: {b}, parameters: {{weight: {v}}}}}\n"
    slerp = "merge_method: slerp\nbase_model: {a}\nmodels:\n  - {{model: {a}}}\n  - {{model: {b}}}\nparameters: {{t: 0.3}}\n"
    repos = {
        "w/base": (base, {}, ""),
        "w/ft": (ft, {"base_model": "w/base"}, ""),
        "w/liar": (stranger.base(), {"base_model": "w/base"}, ""),
        "w/confused": (ft2, {"base_model": "w/liar"}, ""),  # made from w/base, names the stranger
        "w/undeclared": (llama.finetune(34), {}, ""),  # made from w/base, says nothing
        "w/uses-undeclared": (merged("uses", linear.format(a=base, b=llama.finetune(34), w=0.5, v=0.5)),
                              {"base_model": ["w/base", "w/undeclared"]}, ""),
        "w/linear": (merged("linear", linear.format(a=base, b=ft, w=0.5, v=0.5)), {"base_model": ["w/base", "w/ft"]},
                     linear.format(a="w/base", b="w/ft", w=0.5, v=0.5)),
        "w/fibber": (merged("fibber", linear.format(a=base, b=ft, w=0.3, v=0.7)), {"base_model": ["w/base", "w/ft"]},
                     linear.format(a="w/base", b="w/ft", w=0.5, v=0.5)),
        "w/slerp": (merged("slerp", slerp.format(a=base, b=ft)), {"base_model": ["w/base", "w/ft"]},
                    slerp.format(a="w/base", b="w/ft")),
    }
    for repo_id, (folder, meta, config) in repos.items():
        copy = root / "hub" / repo_id
        shutil.copytree(folder, copy)
        card = (f"---\n{yaml.safe_dump(meta)}---\n" if meta else "# no metadata\n") + (f"```yaml\n{config}```\n" if config else "")
        (copy / "README.md").write_text(card)
        if config:  # as uploaded: the config names Hub repos, not the local folders it was merged from
            (copy / "mergekit_config.yml").write_text(config)
        hub.add_repo(repo_id, copy, card_data=meta)
    return repos


@pytest.mark.parametrize("target, edges_wanted", [
    ("w/ft", {("w/base", "w/ft"): "consistent"}),
    ("w/liar", {("w/base", "w/liar"): "unrelated"}),
    ("w/linear", {("w/base", "w/linear"): "verified merge", ("w/ft", "w/linear"): "verified merge"}),
    ("w/fibber", {("w/base", "w/fibber"): "config does not reproduce the weights"}),
    ("w/slerp", {("w/base", "w/slerp"): "verified merge", ("w/ft", "w/slerp"): "verified merge"}),
])
def test_parents_are_checked_against_the_weights(target, edges_wanted, weighed_family, hub):
    graph = crawl(target, depth=1, verify_weights=True)
    for edge, verdict in edges_wanted.items():
        assert graph.edges[edge]["weights"] == verdict, (edge, graph.edges[edge])
    ranged = [p for m, p in hub.requests if p.endswith(" range")]
    assert ranged and not [p for m, p in hub.requests if m == "GET" and p.endswith(".safetensors")]  # never whole files


def test_a_model_whose_parent_does_not_hold_gets_a_suggestion(weighed_family):
    graph = crawl("w/confused", depth=2, verify_weights=True)
    assert graph.edges["w/liar", "w/confused"]["weights"] == "unrelated"
    suggestion = graph.nodes["w/confused"]["suggested_parent"]
    assert suggestion["id"] == "w/base" and suggestion["cosine"] >= 0.5
    assert ("w/base", "w/confused") not in graph.edges  # a suggestion is an attribute, never an edge
    assert "suggested_parent" not in graph.nodes["w/liar"]  # nothing in its graph is close to the stranger
    undeclared = crawl("w/uses-undeclared", depth=2, verify_weights=True).nodes["w/undeclared"]
    assert undeclared["suggested_parent"]["id"] == "w/base"  # never its own descendant


def test_composition_percentages_add_up_to_100():
    from lineage import percentages

    assert percentages({"a": 0.5, "b": 0.125, "c": 0.125, "d": 0.125, "e": 0.125}) == {
        "a": 50, "b": 13, "c": 13, "d": 12, "e": 12}
    assert sum(percentages({k: 1 / 7 for k in "abcdefg"}).values()) == 100


def test_weights_that_cannot_be_read_give_unknown_with_the_reason(weighed_family, hub, llama, tmp_path):
    gated = tmp_path / "gated"
    shutil.copytree(weighed_family["w/base"][0], gated)
    hub.add_repo("w/gated-base", gated, gated=True)
    child = tmp_path / "child"
    shutil.copytree(weighed_family["w/ft"][0], child)
    (child / "README.md").write_text("---\nbase_model: [w/gated-base, w/base]\n---\n")
    (child / "model.safetensors").write_bytes((child / "model.safetensors").read_bytes()[:100])  # header cut short
    hub.add_repo("w/broken", child, card_data={"base_model": ["w/gated-base", "w/base"]})
    graph = crawl("w/broken", depth=1, verify_weights=True)
    assert graph.edges["w/base", "w/broken"]["weights"] == "unknown"
    assert "truncated or corrupt" in graph.edges["w/base", "w/broken"]["weights_reason"]

    hub.faults[r"/w/ft/resolve/"] = [503] * 50  # the Hub keeps failing range requests for one model
    graph = crawl("w/ft", depth=1, verify_weights=True)
    assert graph.edges["w/base", "w/ft"]["weights"] == "unknown"
    assert "headers unreadable" in graph.edges["w/base", "w/ft"]["weights_reason"]
    hub.faults.clear()

    hub.token = "hf_someone_with_access"  # the gated parent's files need a token we do not pass
    (tmp_path / "gchild").mkdir()
    shutil.copytree(weighed_family["w/ft"][0], tmp_path / "gchild", dirs_exist_ok=True)
    (tmp_path / "gchild" / "README.md").write_text("---\nbase_model: w/gated-base\n---\n")
    hub.add_repo("w/gated-child", tmp_path / "gchild", card_data={"base_model": "w/gated-base"})
    graph = crawl("w/gated-child", depth=1, verify_weights=True)
    assert graph.edges["w/gated-base", "w/gated-child"]["weights"] == "unknown"
    assert graph.edges["w/gated-base", "w/gated-child"]["weights_reason"].startswith("gated")
