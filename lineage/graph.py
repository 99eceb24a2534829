"""Stage 3: crawl records into a `networkx.DiGraph` and analyse it.

Edges point parent -> child with `relation`, `sources` (the evidence) and merge parameters.
Nodes carry id, status, license, downloads, likes, tags and `generation`: hops from the target,
negative for ancestors and positive for descendants. The crawl goes level by level with a bounded
pool of concurrent requests, visits each repo once (so cycles end), and marks where it was cut.
"""

from __future__ import annotations

import math
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Optional

import networkx as nx

from .fetch import LineageError, ModelRecord, RecordSource
from .licenses import check_licenses
from .parse import ParentLink, ParsedRecord, _config_links, _numeric, parse_record

DIRECTIONS = ("up", "down", "both")


@dataclass(frozen=True)
class CrawlOptions:
    direction: str = "up"
    depth: int = 4
    max_nodes: int = 150
    concurrency: int = 16
    verify_weights: bool = False  # check each edge against sampled rows of both models' weights (`weights`)

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


class _Discovery:
    """The crawl's first half: records and child lists streamed in as fast as the Hub answers.

    A model's parents are requested the moment its own record is parsed, and a model's children
    the moment it is reached, up to `concurrency` requests in flight, with no barrier between
    generations: the crawl takes about as long as its deepest chain of requests. Distances keep
    the shortest hop count seen; a model reached again by a shorter path is expanded from there.
    """

    def __init__(self, source: RecordSource, options: CrawlOptions):
        self.source, self.options = source, options
        self.records: dict[str, ModelRecord] = {}
        self.parsed: dict[str, Optional[ParsedRecord]] = {}
        self.children: dict[str, list[tuple[str, Optional[str]]]] = {}
        self.up: dict[str, int] = {}  # hops to the target, walking from child to parent
        self.down: dict[str, int] = {}  # hops from the target, walking from parent to child
        self._requested: set[tuple[str, str]] = set()
        self._records_requested = 0
        self._pending: dict[Future, tuple[str, str]] = {}  # in flight: (record | children, model)
        self._pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="lineage")

    def run(self, target: str) -> None:
        try:
            if self.options.direction in ("up", "both"):
                self._reach(self.up, target, 0)
            if self.options.direction in ("down", "both"):
                self._reach(self.down, target, 0)
            while self._pending:
                finished, _ = wait(self._pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    kind, node = self._pending.pop(future)
                    if kind == "record":
                        self._record_arrived(node, future.result())
                    else:
                        self._children_arrived(node, future.result())
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _request(self, kind: str, node: str) -> None:
        if (kind, node) in self._requested:
            return
        if kind == "record":
            if self._records_requested >= 2 * self.options.max_nodes:
                return  # far past what the graph will hold: no more requests
            self._records_requested += 1
        self._requested.add((kind, node))
        call = self._fetch_record if kind == "record" else self.source.children
        self._pending[self._pool.submit(call, node)] = (kind, node)

    def _fetch_record(self, node: str) -> tuple[ModelRecord, Optional[ParsedRecord]]:
        """A record and its evidence, parsed on the worker: the crawl's own thread only schedules."""
        record = self.source.record(node)
        return record, parse_record(record) if record.status in ("ok", "gated", "private") else None

    def _reach(self, distances: dict[str, int], node: str, hops: int) -> None:
        if distances.get(node, math.inf) <= hops:
            return
        distances[node] = hops
        self._request("record", node)
        if distances is self.down and hops <= self.options.depth:
            self._request("children", node)  # at the depth too: to know whether the crawl cut there
        self._expand(node)

    def _expand(self, node: str) -> None:
        """Reach `node`'s parents and children one hop further, as far as what arrived allows."""
        if node in self.up and self.up[node] < self.options.depth and self.parsed.get(node):
            for parent in self.parsed[node].links:
                self._reach(self.up, parent, self.up[node] + 1)
        if node in self.down and self.down[node] < self.options.depth:
            for child, _ in self.children.get(node, ()):
                if child.lower() != node.lower():
                    self._reach(self.down, child, self.down[node] + 1)

    def _record_arrived(self, node: str, found: tuple[ModelRecord, Optional[ParsedRecord]]) -> None:
        self.records[node], self.parsed[node] = found
        self._expand(node)

    def _children_arrived(self, node: str, children: list[tuple[str, Optional[str]]]) -> None:
        self.children[node] = children
        self._expand(node)


def build_lineage(model_id: str, source: RecordSource, options: CrawlOptions = CrawlOptions()) -> nx.DiGraph:
    """The family of `model_id` as a graph: a streamed crawl (`_Discovery`), then the graph built
    from what arrived in a fixed order (nearest models first, then by id), so the same records
    always give the same graph."""
    found = _Discovery(source, options)
    found.run(model_id)
    graph = nx.DiGraph(target=model_id, direction=options.direction, depth=options.depth,
                       max_nodes=options.max_nodes, truncated=False, notes=[])

    def cut(node_id: str, reason: str) -> None:
        graph.nodes[node_id].setdefault("cut", reason)
        graph.graph["truncated"] = True

    def distance(node: str) -> tuple[int, int]:
        up, down = found.up.get(node, math.inf), found.down.get(node, math.inf)
        return (up, 0) if up <= down else (down, 1)

    def exists(node: str) -> bool:
        return node in found.records and found.records[node].status != "missing"

    def real(link: ParentLink) -> bool:
        return not link.needs_check or exists(link.parent)  # parents named only by tags must be repos

    named = {link.parent for parsed in found.parsed.values() if parsed for link in parsed.links.values() if real(link)}
    candidates = {n for n in found.records if n == model_id or n in found.down or n in named}
    ordered = sorted(candidates, key=lambda n: (n != model_id, distance(n)[0], n))
    for node in ordered[:options.max_nodes]:
        hops, side = distance(node)
        graph.add_node(node, **_node_attrs(found.records[node], -hops if side == 0 else hops, found.parsed.get(node)))

    for child in list(graph):  # ancestors' links, as each child's own evidence names them
        parsed = found.parsed.get(child)
        for parent, link in (parsed.links.items() if parsed else ()):
            if not real(link):
                continue
            if parent in graph:
                graph.add_edge(parent, child, **_edge_attrs(link))
            elif child in found.up:
                cut(child, "depth" if found.up[child] >= options.depth else "max_nodes")
    for parent in list(graph):  # descendants, as the Hub lists them
        for child, relation in found.children.get(parent, ()):
            if child.lower() == parent.lower():  # a card naming itself: dropped, as its own parse does
                _note(graph, parent, f"self-reference to {child} in hub_children dropped")
                continue
            if child not in graph:
                if parent in found.down:
                    cut(parent, "depth" if found.down[parent] >= options.depth else "max_nodes")
                continue
            existing = graph.get_edge_data(parent, child)
            own = found.parsed[child].links.get(parent) if found.parsed.get(child) else None
            if existing is None:
                existing = _edge_attrs(own) if own else {"relation": relation or "unknown", "sources": []}
            existing["sources"] = sorted(set(existing.get("sources", [])) | {"hub_children"})
            graph.add_edge(parent, child, **existing)
    graph.graph["cycles"] = find_cycles(graph)
    check_licenses(graph)
    if options.verify_weights:
        if hasattr(source, "token"):
            from .weights import verify_weights

            verify_weights(graph, found.records, token=source.token)
        else:
            graph.graph["notes"].append("weights not checked: the records come from a snapshot, not the Hub")
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
            local = parent.startswith(("/", ".", "~"))  # a folder on this machine: its name reads, its path does not
            graph.add_node(parent, status="ok", detail="", license="", downloads=0, likes=0, tags=[],
                           generation=-1, card_status="none", notes=[], relation="unknown",
                           **({"label": parent.rstrip("/").rsplit("/", 1)[-1]} if local else {}))
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
