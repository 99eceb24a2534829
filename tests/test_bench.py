"""The benchmark keeps working: a tiny smoke run (speed goals live in bench/, not in tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import merge_bench  # noqa: E402


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
