"""The benchmark keeps working: a tiny smoke run (speed goals live in bench/, not in tests)."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import merge_bench  # noqa: E402

from merging import parse_config, plan_merge  # noqa: E402
from merging.execute import peak_memory  # noqa: E402


def test_bench_smoke_run_reports_every_method(tmp_path, capsys):
    out = tmp_path / "results.json"
    code = merge_bench.main(["--small", "--layers", "1", "--methods", "linear,ties", "--cache", str(tmp_path),
                             "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("method | ours s | ours RSS GB")
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["linear", "ties"]
    for row in report["results"]:
        assert row["ours_ok"] and row["ours_rss_gb"] > 0.05 and row["floor_s"] > 0 and row["output_gb"] > 0


def _declared_model(directory: Path, layers: int) -> Path:
    """A Mistral-wide checkpoint whose safetensors header declares every tensor over a sparse file:
    planning reads headers only, so no gigabytes are written."""
    widths = merge_bench.Widths()
    header, offset = {}, 0
    for name, shape in widths.shapes(layers).items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    directory.mkdir(parents=True)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        f.truncate(8 + len(encoded) + offset)
    (directory / "config.json").write_text(json.dumps(widths.config(layers)))
    return directory


@pytest.mark.parametrize("method, measured_gb", [("linear", 0.28), ("slerp", 0.78), ("ties", 1.24), ("dare_ties", 1.25)])
def test_the_memory_estimate_follows_the_streaming_engine(method, measured_gb, tmp_path):
    # measured_gb: the benchmark's peak RSS for these merges on 2 cores (README); a whole-tensor
    # estimate would say 5-8 GB. The estimate may err high, by a little.
    paths = {name: _declared_model(tmp_path / name, 4) for name in merge_bench.MODELS}
    plan = plan_merge(parse_config(merge_bench.config_for(method, paths, 4)))
    assert measured_gb <= peak_memory(plan, workers=2) / 1e9 <= measured_gb + 0.4


def test_lineage_bench_finds_the_whole_family_and_reads_it_again_from_the_cache():
    import subprocess

    # A process of its own: huggingface_hub reads HF_ENDPOINT once, and the bench brings its own Hub.
    done = subprocess.run([sys.executable, "bench/lineage_bench.py", "--size", "20", "--generations", "4",
                           "--latency", "0"], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert report["found"] == report["models"] and int(report["requests"]) == 2 * int(report["models"])
    assert report["cached_requests"] == "0" and report["same_graph"] == "True"
