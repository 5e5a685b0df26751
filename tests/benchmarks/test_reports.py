"""The tables in benchmarks/RESULTS.md are what the report commands print from the committed records (no number
typed by hand), and the reports still read those records."""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.parametrize("module, record", [
    ("moe_tune", "moe-tune-qwen3-30b-a3b-h100-2026-11-23.json"),
    ("moe_tune", "moe-tune-mixtral-8x7b-h100-2026-11-23.json"),
    ("moe_int8_accum", "moe-int8-accum-mixtral-h100-2026-11-23.json"),
])
def test_results_md_holds_the_reported_table(tmp_path, module, record):
    pytest.importorskip("matplotlib")
    report = __import__(module).report
    copy = tmp_path / record
    shutil.copy(RESULTS / record, copy)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report(copy)
    table = [line for line in out.getvalue().splitlines() if line.startswith("|")]
    assert len(table) > 3 and copy.with_suffix(".png").stat().st_size > 10_000
    assert "\n".join(table) in (ROOT / "benchmarks" / "RESULTS.md").read_text()


def test_moe_throughput_pivot_is_the_committed_table():
    """gpu_bench.py report --name of the session's raw rows gives the committed table, and RESULTS.md quotes its
    numbers (FP16, SmoothQuant, FP8 tok/s and the ratio to FP16)."""
    import json

    import report

    rows = [json.loads(line) for line in (RESULTS / "raw" / "h100-2026-11-23-session9-mixtral.jsonl").read_text().splitlines()]
    table = report.markdown(report.pivot(rows))
    assert table + "\n" == (RESULTS / "moe-throughput-mixtral-8x7b-h100-2026-11-23.md").read_text()
    results_md = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    for r in rows:
        assert f"{r['tok_s']:,.0f}" in results_md
