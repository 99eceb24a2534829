"""Licenses along a family tree: the Hub's license ids by family, and which derivatives they allow.

One table decides everything here. A family's rank says how much it restricts what is made from
a model: a derivative should carry terms at least as restrictive as every ancestor's, so a model
whose license ranks below one of its ancestors' (an apache-2.0 merge of a cc-by-nc parent, an MIT
fine-tune of a Llama base) is flagged. Licenses of one family are not compared with each other
(llama3 and gemma differ, but no rank orders them), and an unknown license is never flagged: the
tool says what the cards declare, it does not give legal advice.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import networkx as nx

# rank: how much a derivative is restricted (higher: more)
FAMILY_RANKS = {"permissive": 0, "copyleft": 1, "custom": 2, "non-commercial": 3}

# Hub license ids (https://huggingface.co/docs/hub/repositories-licenses) by family.
LICENSE_FAMILIES: dict[str, str] = {
    **dict.fromkeys([
        "apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "bsl-1.0", "isc",
        "zlib", "unlicense", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "afl-3.0",
        "artistic-2.0", "ecl-2.0", "wtfpl", "postgresql", "ncsa", "pddl", "odc-by", "cdla-permissive-1.0",
        "cdla-permissive-2.0", "c-uda", "etalab-2.0", "openrail",
    ], "permissive"),
    **dict.fromkeys([
        "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "lgpl-lr", "agpl-3.0", "mpl-2.0", "epl-1.0",
        "epl-2.0", "cc-by-sa-3.0", "cc-by-sa-4.0", "ofl-1.1", "odbl", "osl-3.0", "lppl-1.3c", "eupl-1.1",
        "eupl-1.2", "cdla-sharing-1.0", "gfdl",
    ], "copyleft"),
    **dict.fromkeys([
        "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma", "bigscience-openrail-m",
        "creativeml-openrail-m", "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "openrail++", "apple-ascl",
        "h-research",
    ], "custom"),
    **dict.fromkeys([
        "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0",
        "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cc-by-nd-4.0", "apple-amlr", "llama-research", "intel-research",
        "deepfloyd-if-license", "fair-noncommercial-research-license",
    ], "non-commercial"),
}


def license_family(license_id: Optional[str]) -> str:
    """permissive / copyleft / custom (community licenses with conditions) / non-commercial / unknown."""
    return LICENSE_FAMILIES.get((license_id or "").strip().lower(), "unknown")


def restriction(license_id: Optional[str]) -> Optional[int]:
    """The license's family rank, or None when the license is unknown."""
    return FAMILY_RANKS.get(license_family(license_id))


@dataclass(frozen=True)
class LicenseConflict:
    """A model whose license is more permissive than an ancestor's, with the path between them."""

    ancestor: str
    ancestor_license: str
    path: tuple[str, ...]  # ancestor first, the model last

    def as_dict(self) -> dict:
        return {"ancestor": self.ancestor, "ancestor_license": self.ancestor_license, "path": list(self.path)}


def license_conflict(graph: nx.DiGraph, node: str) -> Optional[LicenseConflict]:
    """The most restrictive ancestor whose license ranks above `node`'s (the nearest of those), or None."""
    own = restriction(graph.nodes[node].get("license"))
    if own is None:
        return None
    came_from: dict[str, Optional[str]] = {node: None}
    queue, worst = deque([node]), None
    while queue:  # breadth first: the first ancestor found at a rank is the nearest there
        current = queue.popleft()
        for parent in graph.predecessors(current):
            if parent in came_from:
                continue  # a cycle, or a shorter path already
            came_from[parent] = current
            queue.append(parent)
            rank = restriction(graph.nodes[parent].get("license"))
            if rank is not None and rank > own and (worst is None or rank > worst[0]):
                worst = (rank, parent)
    if worst is None:
        return None
    path, step = [], worst[1]
    while step is not None:
        path.append(step)
        step = came_from[step]
    return LicenseConflict(worst[1], graph.nodes[worst[1]]["license"], tuple(path))


def conflict_text(data: dict) -> str:
    """One line for a graph node's `license_conflict`, or "" when it has none."""
    conflict = data.get("license_conflict")
    if not conflict:
        return ""
    license_id, theirs = data.get("license", ""), conflict["ancestor_license"]
    return (f"{license_id} ({license_family(license_id)}) is more permissive than {theirs} ({license_family(theirs)}) "
            f"of ancestor {conflict['ancestor']}, via {' -> '.join(conflict['path'])}")


def check_licenses(graph: nx.DiGraph) -> dict[str, LicenseConflict]:
    """Flag every model of the graph that is more permissive than an ancestor: sets its
    `license_family` and, where flagged, `license_conflict`; returns the conflicts by model."""
    conflicts = {}
    for node in graph:
        graph.nodes[node]["license_family"] = license_family(graph.nodes[node].get("license"))
        conflict = license_conflict(graph, node)
        if conflict is not None:
            graph.nodes[node]["license_conflict"] = conflict.as_dict()
            conflicts[node] = conflict
    return conflicts


def required_license(licenses: dict[str, Optional[str]]) -> str:
    """What a merge of parents with these licenses must carry at least, in one line."""
    known = {model: lic for model, lic in licenses.items() if restriction(lic) is not None}
    unknown = sorted(model for model in licenses if model not in known)
    if not known:
        return "license: no parent declares a known license; check each parent's terms before publishing"
    model, strictest = max(known.items(), key=lambda item: (restriction(item[1]), item[0]))
    line = (f"license: the result must carry terms at least as restrictive as {strictest} "
            f"({license_family(strictest)}, from {model})")
    return line + (f"; unknown for {', '.join(unknown)}" if unknown else "")
