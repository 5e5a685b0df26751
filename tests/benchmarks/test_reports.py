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
    ("moe_tune", "moe-quick-mixtral-8x7b-h100-2026-11-23-session10.json"),
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


@pytest.mark.parametrize("raw, pivot", [
    ("h100-2026-11-23-session9-mixtral.jsonl", "moe-throughput-mixtral-8x7b-h100-2026-11-23.md"),
    ("h100-2026-11-23-session10-mixtral.jsonl", "moe-throughput-mixtral-8x7b-h100-2026-11-23-repeats.md"),
])
def test_moe_throughput_pivot_is_the_committed_table(raw, pivot):
    """gpu_bench.py report --name of a session's raw rows gives the committed table (repeats: the mean and the range
    of the runs), and RESULTS.md quotes every run's tok/s and the pivoted table."""
    import json

    import report

    rows = [json.loads(line) for line in (RESULTS / "raw" / raw).read_text().splitlines()]
    table = report.markdown(report.pivot(rows))
    assert table + "\n" == (RESULTS / pivot).read_text()
    results_md = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    for r in rows:
        assert f"{r['tok_s']:,.0f}" in results_md
    if any(r.get("run") for r in rows):
        assert table.splitlines()[-1] in results_md


def test_repeats_pivot_to_their_mean_and_range():
    import report

    row = lambda variant, tok_s: {"device": "D", "vllm": "v", "model": "m", "tool": "vllm bench throughput",
                                  "workload": "w", "date": "d", "variant": variant, "tok_s": tok_s, "command": "c"}
    (piv,) = report.pivot([row("fp16", 100.0), row("smoothquant", 110.0), row("fp16", 80.0), row("smoothquant", 130.0),
                           row("smoothquant", 120.0)])
    assert piv["fp16_tok_s"] == 90.0 and piv["smoothquant_tok_s"] == 120.0
    assert piv["smoothquant_tok_s_runs"] == [110.0, 130.0, 120.0] and piv["smoothquant_runs"] == 3
    assert "120 (mean of 3: 110–130)" in report.markdown([piv]) and "| 1.33x |" in report.markdown([piv])
