"""Command line: ``python -m lineage MODEL_ID [options]`` prints the family tree and its cycles."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from merging.errors import HubError
from merging.hub import repo_id_problem

from .export import to_graphml, to_json, to_mermaid, to_svg
from .fetch import DiskCache, HubSource, LineageError, RecordingSource, SnapshotSource, default_cache_dir
from .graph import DIRECTIONS, CrawlOptions, build_lineage, composition_text, roots, text_tree
from .licenses import conflict_text
from .render import render_html


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lineage", description="Draw a model's family tree from the Hub.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model_id")
    parser.add_argument("--direction", choices=DIRECTIONS, default="up", help="ancestors, descendants or both")
    parser.add_argument("--depth", type=int, default=4, help="hops from the model")
    parser.add_argument("--max-nodes", type=int, default=150)
    parser.add_argument("--concurrency", type=int, default=16, help="Hub requests in flight")
    parser.add_argument("--json", type=Path, help="write networkx node-link JSON")
    parser.add_argument("--html", type=Path, help="write the interactive pyvis page")
    parser.add_argument("--graphml", type=Path)
    parser.add_argument("--mermaid", type=Path, help="write a Mermaid flowchart")
    parser.add_argument("--svg", type=Path, help="write an SVG picture (for a model card)")
    parser.add_argument("--color-by", choices=("relation", "license"), default="relation")
    parser.add_argument("--physics", action="store_true", help="force layout instead of the hierarchy")
    parser.add_argument("--snapshot", type=Path, help="read Hub data from this snapshot, not the network")
    parser.add_argument("--save-snapshot", type=Path, help="save what a live crawl read, for offline use")
    parser.add_argument("--no-cache", action="store_true", help="skip the on-disk cache")
    parser.add_argument("--verify-weights", action="store_true",
                        help="check each edge against a few sampled rows of both models' weights (range requests)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        problem = repo_id_problem(args.model_id)
        if problem or "/" not in args.model_id:
            raise LineageError(f"MODEL_ID: {args.model_id[:80]!r} is not a Hub model id like 'org/name'"
                             + (f" ({problem})" if problem else ""))
        options = CrawlOptions(args.direction, args.depth, args.max_nodes, args.concurrency, args.verify_weights)
        if args.snapshot:
            source = SnapshotSource(args.snapshot)
        else:
            cache = None if args.no_cache else DiskCache(default_cache_dir())
            source = HubSource(token=os.environ.get("HF_TOKEN") or None, cache=cache)
        recorder = RecordingSource(source) if args.save_snapshot else None
        graph = build_lineage(args.model_id, recorder or source, options)
        target = graph.nodes[args.model_id]
        if target["status"] == "missing":
            where = (f"the snapshot {args.snapshot}, which holds only the family of {source.target}"
                     if isinstance(source, SnapshotSource) else "the Hub (or it is private: set HF_TOKEN)")
            raise LineageError(f"MODEL_ID: {args.model_id} is not in {where}")
    except (LineageError, HubError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text_tree(graph))
    cycles = graph.graph["cycles"]
    print(f"\ncycles: {len(cycles)}")
    for cycle in cycles:
        print("  " + " -> ".join(cycle + cycle[:1]))
    print("roots: " + ", ".join(roots(graph)))
    print("composition: " + composition_text(graph))
    if graph.graph.get("weights_checked"):
        verdicts = [(u, v, d) for u, v, d in graph.edges(data=True) if d.get("weights")]
        print(f"weights: {len(verdicts)} edges checked")
        for parent, child, data in sorted(verdicts, key=lambda e: (e[1], e[0])):
            detail = data.get("weights_reason") or (f"cosine {data['weights_cosine']:.3f}" if "weights_cosine" in data
                                                    else "")
            print(f"  {parent} -> {child}: {data['weights']}" + (f" ({detail})" if detail else ""))
        for node, suggestion in sorted(graph.nodes(data="suggested_parent")):
            if suggestion:
                print(f"  {node}: suggested parent {suggestion['id']} (cosine {suggestion['cosine']:.3f})")
    conflicts = sorted(n for n, conflict in graph.nodes(data="license_conflict") if conflict)
    print(f"license conflicts: {len(conflicts)}")
    for node in conflicts:
        print(f"  {node}: {conflict_text(graph.nodes[node])}")
    if graph.graph["truncated"]:
        cut = sorted(n for n, reason in graph.nodes(data="cut") if reason)
        print(f"cut short at: {', '.join(cut)} (raise --depth or --max-nodes)")
    if args.json:
        args.json.write_text(json.dumps(to_json(graph), indent=1) + "\n")
    if args.html:
        args.html.write_text(render_html(graph, color_by=args.color_by, physics=args.physics))
    if args.graphml:
        to_graphml(graph, args.graphml)
    if args.mermaid:
        args.mermaid.write_text(to_mermaid(graph))
    if args.svg:
        args.svg.write_text(to_svg(graph, color_by=args.color_by))
    if recorder:
        recorder.save(args.save_snapshot, target=args.model_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
