"""Lineage crawl benchmark: a synthetic merge family served by the tests' fake Hub with latency.

The family has `--generations` generations below one root each, about `--size` models in all;
every model past the first generation is a merge of two models of the generation above, named
in its card's `base_model` and in a mergekit config block. The target is the last model of the
last generation, and the crawl asks for its ancestors. Each answer of the fake Hub waits
`--latency` seconds, as a remote Hub's round trip would.

What bounds a crawl from below is its critical path: every generation needs its models' metadata
and cards (asked for side by side, one round trip) before the next generation is known, so
`generations x 1 x latency`. The
report gives the cold crawl's time, its requests and the most in flight at once, that bound and
the ratio, and the same crawl again in the same process from the disk cache.

    python3 bench/lineage_bench.py --size 150 --generations 14 --latency 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_hub import FakeHub  # noqa: E402

REQUESTS_PER_GENERATION = 1  # model info and the card side by side (config files, when present: one more)


def family(size: int, generations: int) -> dict[str, list[str]]:
    """Model id -> its parents; the last id is the target, and every other model is its ancestor.

    Counted from the target up, generation k holds min(2**k, width) models, with `width` the
    smallest that gives `size` models or more; model i merges models 2i and 2i+1 of the generation
    above (modulo its width), so the family widens fast and then runs deep."""
    width = 1
    while sum(min(2**k, width) for k in range(generations + 1)) < size:
        width += 1
    layers = [[f"bench/g{g:02d}-m{i:03d}" for i in range(min(2 ** (generations - g), width))]
              for g in range(generations + 1)]  # layers[0]: the roots; layers[-1]: the target alone
    parents: dict[str, list[str]] = {}
    for g, layer in enumerate(layers):
        above = layers[g - 1] if g else []
        for i, model in enumerate(layer):
            parents[model] = list(dict.fromkeys([above[2 * i % len(above)], above[(2 * i + 1) % len(above)]])) \
                if above else []
    return parents


def serve(hub: FakeHub, parents: dict[str, list[str]], root: Path) -> None:
    for model, names in parents.items():
        folder = root / model
        folder.mkdir(parents=True)
        meta = {"license": "apache-2.0", **({"base_model": names} if names else {})}
        config = "".join(["```yaml\nmerge_method: linear\nmodels:\n",
                          *[f"  - {{model: {p}, parameters: {{weight: 0.5}}}}\n" for p in names], "```\n"]) \
            if names else ""
        (folder / "README.md").write_text("---\n" + json.dumps(meta) + "\n---\n# " + model + "\n" + config)
        hub.add_repo(model, folder, card_data=meta, tags=[f"base_model:merge:{p}" for p in names])


def _serve(size: int, generations: int, latency: float, control) -> None:
    """The fake Hub in a process of its own, so its Python does not share the crawl's interpreter
    lock or cores with the client being measured. Answers `stats`, `reset` and `stop` on `control`."""
    hub = FakeHub().start()
    with tempfile.TemporaryDirectory(prefix="lineage-bench-") as work:
        parents = family(size, generations)
        serve(hub, parents, Path(work) / "repos")
        hub.latency = latency
        control.send((hub.endpoint, list(parents)))
        while True:
            command = control.recv()
            if command == "stats":
                control.send((len(hub.requests), hub.peak_in_flight))
            elif command == "reset":
                hub.requests.clear()
                hub.peak_in_flight = 0
                control.send(None)
            else:
                hub.stop()
                return


def run(size: int, generations: int, latency: float, concurrency: int) -> dict:
    import multiprocessing

    here, there = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(size, generations, latency, there))
    server.start()
    endpoint, models = here.recv()
    os.environ["HF_ENDPOINT"] = endpoint  # huggingface_hub reads it when first imported, below
    from lineage import CrawlOptions, DiskCache, HubSource, build_lineage

    target = models[-1]
    options = CrawlOptions(direction="up", depth=generations + 1, max_nodes=len(models) + 10, concurrency=concurrency)
    with tempfile.TemporaryDirectory(prefix="lineage-bench-cache-") as cache_dir:
        try:
            cache = DiskCache(Path(cache_dir))
            started = time.perf_counter()
            graph = build_lineage(target, HubSource(cache=cache), options)
            cold = time.perf_counter() - started
            here.send("stats")
            requests, peak = here.recv()
            here.send("reset")
            here.recv()
            started = time.perf_counter()
            again = build_lineage(target, HubSource(cache=cache), options)
            warm = time.perf_counter() - started
            here.send("stats")
            cached_requests, _ = here.recv()
        finally:
            here.send("stop")
            server.join(timeout=30)
    bound = (generations + 1) * REQUESTS_PER_GENERATION * latency
    return {"models": len(models), "generations": generations + 1, "latency_s": latency,
            "concurrency": concurrency, "found": graph.number_of_nodes(), "cold_s": cold, "requests": requests,
            "peak_in_flight": peak, "critical_path_s": bound, "vs_critical_path": cold / bound if bound else None,
            "cached_s": warm, "cached_requests": cached_requests, "cached_speedup": cold / warm,
            "same_graph": sorted(graph.edges) == sorted(again.edges)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=150, help="models in the family")
    parser.add_argument("--generations", type=int, default=14, help="generations below the roots")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds each answer of the Hub waits")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)
    result = run(args.size, args.generations, args.latency, args.concurrency)
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), **result}, indent=2) + "\n")
    return 0 if result["found"] == result["models"] and result["same_graph"] else 1


if __name__ == "__main__":
    sys.exit(main())
