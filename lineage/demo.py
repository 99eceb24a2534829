"""The offline demo: a snapshot of one real merge family, built from ../shared/lineage-demo.json.

Each fact becomes the evidence it was read from: card metadata becomes a card's YAML front matter,
a mergekit config becomes a ```yaml block in the card, and links read from prose or third-party
summaries become `reportedParents` entries that say so. Rebuild with ``python -m lineage.demo``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from .fetch import ModelRecord, child_tag, write_snapshot

DEMO_SNAPSHOT = Path(__file__).resolve().parent / "data" / "demo_snapshot.json"
SHARED_FACTS = Path(__file__).resolve().parent.parent.parent / "shared" / "lineage-demo.json"


def _card(model_id: str, facts: dict) -> tuple[str, dict]:
    parents = facts.get("parents", [])
    meta: dict = {}
    if facts.get("license"):
        meta["license"] = facts["license"]
    metadata_parents = [p["id"] for p in parents if "card metadata" in p.get("evidence", "")]
    if metadata_parents:
        meta["base_model"] = metadata_parents if len(metadata_parents) > 1 else metadata_parents[0]
        relations = {p["relation"] for p in parents if p["id"] in metadata_parents}
        if len(relations) == 1:
            meta["base_model_relation"] = relations.pop()
    if facts.get("tags"):
        meta["tags"] = facts["tags"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", f"# {model_id.split('/')[-1]}", ""]
    config_parents = [p for p in parents if "mergekit config" in p.get("evidence", "")]
    if config_parents:
        config: dict = {"slices": [{"sources": [{"model": p["id"], "layer_range": p.get("layer_range", [0, 32])}
                                                for p in config_parents]}],
                        "merge_method": facts.get("merge_method", "slerp")}
        base = next((p["id"] for p in config_parents if p.get("role") == "base_model"), None)
        if base:
            config["base_model"] = base
        t = next((p["t"] for p in config_parents if "t" in p), None)
        if t is not None:
            config["parameters"] = {"t": t}
        if facts.get("dtype"):
            config["dtype"] = facts["dtype"]
        lines += ["## Configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines), meta


def build_demo_snapshot(facts_path: Path = SHARED_FACTS, out: Path = DEMO_SNAPSHOT) -> Path:
    facts = json.loads(Path(facts_path).read_text())
    records = []
    children: dict[str, list[str]] = {}
    for model_id, model in facts["models"].items():
        reported = [{"id": p["id"], "relation": p["relation"], "evidence": p["evidence"]}
                    for p in model.get("parents", [])
                    if "card metadata" not in p["evidence"] and "mergekit config" not in p["evidence"]]
        card, card_data = _card(model_id, model)
        info = {"id": model_id, "cardData": card_data or None, "tags": list(model.get("tags", [])),
                "downloads": 0, "likes": 0, "siblings": [{"rfilename": "README.md"}]}
        if reported:
            info["reportedParents"] = reported
        records.append(ModelRecord(model_id, "ok", info, card))
        for parent in model.get("parents", []):
            for tag in (child_tag(parent["id"]), child_tag(parent["id"], parent["relation"])):
                children.setdefault(tag, []).append(model_id)
    write_snapshot(out, records, children, facts.get("target"))
    return out


if __name__ == "__main__":
    print(build_demo_snapshot(*(Path(a) for a in sys.argv[1:])))
