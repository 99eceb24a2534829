"""Stage 3: crawl records into a `networkx.DiGraph` and analyse it.

Edges point parent -> child with `relation`, `sources` (the evidence) and merge parameters.
Nodes carry id, status, license, downloads, likes, tags and `generation`: hops from the target,
negative for ancestors and positive for descendants. The crawl goes level by level with a bounded
pool of concurrent requests, visits each repo once (so cycles end), and marks where it was cut.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import networkx as nx

from .fetch import RELATIONS, LineageError, ModelRecord, RecordSource
from .parse import ParentLink, ParsedRecord, _config_links, _numeric, parse_record

DIRECTIONS = ("up", "down", "both")


@dataclass(frozen=True)
class CrawlOptions:
    direction: str = "up"
    depth: int = 4
    max_nodes: int = 150
    concurrency: int = 8

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise LineageError(f"direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        if self.depth < 0 or self.max_nodes < 1 or self.concurrency < 1:
            raise LineageError("depth must be >= 0, max_nodes and concurrency >= 1")


def own_relation(parsed: Optional[ParsedRecord]) -> str:
    """How a model relates to its parents by its own evidence, whatever the crawl drew: the first
    link's relation (links come ranked by their evidence), `root` with no parent, `unknown`
    where nothing could be read."""
    if parsed is None:
        return "unknown"
    return next(iter(parsed.links.values())).relation if parsed.links else "root"


def _node_attrs(record: ModelRecord, generation: int, parsed: Optional[ParsedRecord]) -> dict:
    info = record.info
    card = info.get("cardData") or {}
    license_ = card.get("license") if isinstance(card, dict) else None
    if not license_:
        license_ = next((t.split(":", 1)[1] for t in info.get("tags", []) if isinstance(t, str)
                         and t.startswith("license:")), None)
    return {
        "status": record.status, "detail": record.detail, "license": str(license_) if license_ else "",
        "downloads": int(info.get("downloads") or 0), "likes": int(info.get("likes") or 0),
        "tags": [t for t in info.get("tags", []) if isinstance(t, str)], "generation": generation,
        "card_status": parsed.card_status if parsed else "none", "notes": list(parsed.notes) if parsed else [],
        "relation": own_relation(parsed),
    }


def _edge_attrs(link: ParentLink) -> dict:
    return {"relation": link.relation, "sources": sorted(link.sources), **link.params}


def build_lineage(model_id: str, source: RecordSource, options: CrawlOptions = CrawlOptions()) -> nx.DiGraph:
    graph = nx.DiGraph(target=model_id, direction=options.direction, depth=options.depth,
                       max_nodes=options.max_nodes, truncated=False, notes=[])
    records: dict[str, ModelRecord] = {}
    parsed = {}

    def fetch_all(ids: list[str]) -> None:
        todo = [i for i in dict.fromkeys(ids) if i not in records]
        with ThreadPoolExecutor(max_workers=options.concurrency) as pool:
            for record in pool.map(source.record, todo):
                records[record.id] = record
                parsed[record.id] = parse_record(record) if record.status in ("ok", "gated", "private") else None

    def add_node(node_id: str, generation: int) -> None:
        graph.add_node(node_id, **_node_attrs(records[node_id], generation, parsed.get(node_id)))

    def room() -> bool:
        return graph.number_of_nodes() < options.max_nodes

    def cut(node_id: str, reason: str) -> None:
        graph.nodes[node_id]["cut"] = reason
        graph.graph["truncated"] = True

    fetch_all([model_id])
    add_node(model_id, 0)
    up = [model_id] if options.direction in ("up", "both") else []
    down = [model_id] if options.direction in ("down", "both") else []

    for hop in range(1, options.depth + 2):
        # Ancestors: parents named by each frontier node's evidence.
        wanted: dict[str, list[tuple[str, ParentLink]]] = {}
        for child in up:
            for link in (parsed[child].links.values() if parsed.get(child) else ()):
                wanted.setdefault(link.parent, []).append((child, link))
        # Descendants: children the Hub lists under each frontier node, by any relation.
        found: dict[str, list[tuple[str, str]]] = {}
        if down:
            queries = [(parent, relation) for parent in down for relation in (None, *RELATIONS)]
            with ThreadPoolExecutor(max_workers=options.concurrency) as pool:
                answers = list(pool.map(lambda q: source.children(*q), queries))
            for (parent, relation), children in zip(queries, answers):
                for child in children:
                    if child.lower() == parent.lower():  # a card naming itself: dropped, as its own parse does
                        _note(graph, parent, f"self-reference to {child} in hub_children dropped")
                        continue
                    found.setdefault(child, []).append((parent, relation or "unknown"))
        if hop > options.depth:
            for node in {c for c, _ in sum(wanted.values(), [])} | {p for p, _ in sum(found.values(), [])}:
                cut(node, "depth")
            break
        fetch_all([p for p in wanted if p not in graph] + [c for c in found if c not in graph])
        next_up, next_down = [], []
        for parent, children in wanted.items():
            exists = records[parent].status != "missing"
            for child, link in children:
                if link.needs_check and not exists:
                    continue  # a tag that is not a repo id
                if parent not in graph:
                    if not room():
                        cut(child, "max_nodes")
                        continue
                    add_node(parent, -hop)
                    next_up.append(parent)
                graph.add_edge(parent, child, **_edge_attrs(link))
        for child, parents in found.items():
            for parent, relation in parents:
                if child not in graph:
                    if not room():
                        cut(parent, "max_nodes")
                        continue
                    add_node(child, hop)
                    next_down.append(child)
                own = parsed[child].links.get(parent) if parsed.get(child) else None
                attrs = _edge_attrs(own) if own else {"relation": relation, "sources": []}
                if not own and relation != "unknown":
                    attrs["relation"] = relation
                existing = graph.get_edge_data(parent, child, {})
                sources = set(existing.get("sources", [])) | set(attrs["sources"]) | {"hub_children"}
                graph.add_edge(parent, child, **{**attrs, **{k: v for k, v in existing.items() if k != "sources"},
                                                 "sources": sorted(sources)})
        up, down = next_up, next_down
        if not up and not down:
            break
    graph.graph["cycles"] = find_cycles(graph)
    return graph


def _note(graph: nx.DiGraph, node: str, note: str) -> None:
    notes = graph.nodes[node].setdefault("notes", [])
    if note not in notes:
        notes.append(note)


def merge_preview(config: dict, child: str) -> nx.DiGraph:
    """The family a merge config would create: its parents and the planned child, one hop."""
    graph = nx.DiGraph(target=child, direction="up", depth=1, max_nodes=0, truncated=False, notes=[], cycles=[])
    graph.add_node(child, status="ok", detail="planned merge", license="", downloads=0, likes=0, tags=[],
                   generation=0, card_status="none", notes=["the merge this config describes"], relation="merge")
    for parent, params in _config_links(config, keep_local=True):
        if parent not in graph:
            graph.add_node(parent, status="ok", detail="", license="", downloads=0, likes=0, tags=[],
                           generation=-1, card_status="none", notes=[], relation="unknown")
        data = graph.get_edge_data(parent, child) or {"relation": "merge", "sources": ["mergekit_config"]}
        graph.add_edge(parent, child, **{**params, **data})
    return graph


def find_cycles(graph: nx.DiGraph, limit: int = 100) -> list[list[str]]:
    cycles = []
    for cycle in nx.simple_cycles(graph):
        start = cycle.index(min(cycle))  # a canonical rotation, so output does not depend on visit order
        cycles.append(cycle[start:] + cycle[:start])
        if len(cycles) >= limit:
            break
    return sorted(cycles, key=lambda c: (len(c), c))


def roots(graph: nx.DiGraph) -> list[str]:
    """Foundation models of the family: nodes with no known parent."""
    return sorted(n for n in graph if graph.in_degree(n) == 0)


def parent_shares(graph: nx.DiGraph, child: str, parents: list[str]) -> dict[str, float]:
    """How much of `child` each parent accounts for, from the merge parameters on its edges."""
    if not parents:
        return {}
    edges = {p: graph.edges[p, child] for p in parents}
    merges = {p: e for p, e in edges.items() if e.get("relation") == "merge"}
    methods = {e.get("method") for e in merges.values()} - {None}
    if merges and methods & {"slerp", "nearswap"} and len(merges) == 2:
        base = next((p for p, e in merges.items() if e.get("role") == "base_model"), None)
        t = next((_numeric(e["t"]) for e in merges.values() if "t" in e), None)
        if base is not None and t is not None:
            other = next(p for p in merges if p != base)
            return {base: 1 - t, other: t}
    weights = {p: _numeric(e.get("weight")) for p, e in merges.items()}
    known = {p: w for p, w in weights.items() if w is not None and w > 0}
    if known:
        total = sum(known.values())
        return {p: w / total for p, w in known.items()}
    return {p: 1 / len(parents) for p in parents}


def composition(graph: nx.DiGraph, target: Optional[str] = None) -> dict[str, float]:
    """The share of each root (foundation) model in `target`, propagated through merge weights.

    Slerp splits by t (base 1-t, other t), linear/ties/dare by normalized weights, unknown weights
    equally. An edge that closes a cycle is ignored, so a model never counts towards itself.
    """
    target = target or graph.graph["target"]
    memo: dict[str, dict[str, float]] = {}

    def share(node: str, path: frozenset) -> dict[str, float]:
        if node in memo:
            return memo[node]
        parents = [p for p in graph.predecessors(node) if p not in path and p != node]
        if not parents:
            result = {node: 1.0}
        else:
            result: dict[str, float] = {}
            for parent, weight in parent_shares(graph, node, parents).items():
                for root, part in share(parent, path | {node}).items():
                    result[root] = result.get(root, 0.0) + weight * part
        memo[node] = result
        return result

    shares = share(target, frozenset())
    return dict(sorted(shares.items(), key=lambda kv: (-kv[1], kv[0])))


def percentages(shares: dict[str, float]) -> dict[str, int]:
    """Whole percentages that add up to 100 (largest remainders round up), in the shares' order."""
    if not shares:
        return {}
    total = sum(shares.values()) or 1.0
    exact = {k: 100 * v / total for k, v in shares.items()}
    result = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (result[k] - exact[k], k))[:100 - sum(result.values())]:
        result[k] += 1
    return result


def composition_text(graph: nx.DiGraph) -> str:
    """`50% a, 25% b, ...`: the target's ancestry composition, in whole percentages adding up to 100."""
    return ", ".join(f"{share}% {root}" for root, share in percentages(composition(graph)).items())


def text_tree(graph: nx.DiGraph) -> str:
    """An indented tree: ancestors above the target, descendants below.

    A model reached again (merges share ancestors) is printed with "(see above)" instead of its
    subtree again, so the output grows with the edges, not with the paths: a lattice of a few
    dozen merges has millions of paths.
    """
    target = graph.graph["target"]
    lines = []

    def label(node: str) -> str:
        data = graph.nodes[node]
        extra = [data["status"]] if data.get("status") != "ok" else []
        if data.get("cut"):
            extra.append(f"cut: {data['cut']}")
        return node + (f" [{', '.join(extra)}]" if extra else "")

    def walk(root: str, neighbours, arrow: str) -> None:
        printed = {root}
        path = {root}

        def visit(node: str, depth: int) -> None:
            for other in sorted(neighbours(node)):
                edge = graph.edges[other, node] if arrow == "<-" else graph.edges[node, other]
                method = f" {edge['method']}" if edge.get("method") else ""
                again = " (cycle)" if other in path else " (see above)" if other in printed and \
                    any(True for _ in neighbours(other)) else ""
                lines.append(f"{'  ' * depth}{arrow} {edge['relation']}{method}: {label(other)}{again}")
                if other not in printed:
                    printed.add(other)
                    path.add(other)
                    visit(other, depth + 1)
                    path.discard(other)

        visit(root, 1)

    lines.append(label(target))
    walk(target, graph.predecessors, "<-")
    walk(target, graph.successors, "->")
    return "\n".join(lines)
