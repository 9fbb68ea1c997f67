"""benchmarks/run_all.py: the markdown report, from figures of one run (no lab needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# benchmarks/ is a package of the repository, not of the installed project.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchmarks import report
from benchmarks.report import Figure, collecting, emit
from benchmarks.run_all import Outcome, render, table

HEADER = {
    "command": "python -m benchmarks.run_all",
    "run_id": "20261203T100000Z",
    "mode": "full run counts",
    "raw": "results/20261203T100000Z.jsonl",
    "date": "2026-12-03 10:00 UTC",
    "commit": "abc123",
    "cpu": "Test CPU, 2 logical CPUs",
    "ram": "23.4 GiB",
    "kernel": "6.1.0",
    "os": "Debian GNU/Linux 12",
    "load": "0.50",
    "lab": "2 nodes",
    "wall": "1.0 min",
}


def row(lines: list[str], figure: str) -> list[str]:
    found = [line for line in lines if line.startswith(f"| {figure} (")]
    assert len(found) == 1, lines
    return [c.strip() for c in found[0].strip("|").split("|")]


def replication_outcome() -> Outcome:
    local = Figure("replication", "4k_fdatasync_local", "ops/s", [1000.0, 1200.0, 800.0])
    repl = Figure(
        "replication",
        "4k_fdatasync_replicated",
        "ops/s",
        [300.0, 500.0, 400.0],
        anchor="4k_fdatasync_local",
    )
    ratio = Figure(
        "replication", "4k_fdatasync_ratio", "repl/local", [0.3, 0.42, 0.5], target=">= 0.40"
    )
    ratio.passed = ratio.median >= 0.40
    low = Figure("replication", "1m_sequential_ratio", "repl/local", [0.2], target=">= 0.40")
    low.passed = False
    return Outcome("replication", "writes", ("--runs", "3"), [local, repl, ratio, low])


def test_ratio_is_median_over_the_anchor_median_of_the_same_run() -> None:
    cells = row(table(replication_outcome()), "4k_fdatasync_replicated")
    # figure | median | p95 | runs | anchor | ratio | target | verdict
    assert cells[1] == "400"
    assert cells[2] == "500"
    assert cells[3] == "3"
    assert cells[4] == "4k_fdatasync_local (1,000 ops/s)"
    assert cells[5] == "0.40"
    assert cells[7] == "-"  # no target of its own


def test_numbers_keep_their_precision() -> None:
    fig = Figure("failover", "failover_time", "s", [1.995, 2.0449], target="median <= 2.5")
    fig.passed = True
    cells = row(table(Outcome("failover", figures=[fig])), "failover_time")
    assert cells[1:4] == ["2.02", "2.04", "2"]
    assert cells[7] == "pass"


def test_pass_and_fail_against_targets() -> None:
    lines = table(replication_outcome())
    assert row(lines, "4k_fdatasync_ratio")[6:] == [">= 0.40", "pass"]
    assert row(lines, "1m_sequential_ratio")[6:] == [">= 0.40", "**FAIL**"]
    assert row(lines, "4k_fdatasync_ratio")[4:6] == ["-", "-"]  # no anchor: no ratio
    assert replication_outcome().verdict == "FAIL"


def test_anchor_missing_from_the_run_is_said_not_guessed() -> None:
    lone = Figure("resync", "incremental_resync_s", "s", [10.0], anchor="rsync_a_same_tree_s")
    cells = row(table(Outcome("resync", figures=[lone])), "incremental_resync_s")
    assert cells[4] == "rsync_a_same_tree_s (not measured in this run)"
    assert cells[5] == "n/a"


def test_a_crashed_benchmark_is_an_error_row_and_the_others_still_render() -> None:
    crashed = Outcome("farm", "farm", (), [], error="SystemExit: weather is not UP | node2")
    text = render(HEADER, [replication_outcome(), crashed])
    assert crashed.verdict == "error"
    assert "| **error: SystemExit: weather is not UP \\| node2** |" in text
    assert "| [farm](#farm) | error: SystemExit: weather is not UP \\| node2 | 0 |" in text
    assert "| [replication](#replication) | FAIL | 4 |" in text
    assert "## replication" in text
    assert "Test CPU, 2 logical CPUs; 23.4 GiB RAM; kernel 6.1.0" in text
    assert "git commit: abc123" in text


def test_emit_stamps_the_run_id_and_collects_only_that_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    emit([Figure("failover", "before", "s", [1.0])])
    with collecting("RUN1") as figures:
        emit([Figure("failover", "failover_time", "s", [1.0, 2.0], target="median <= 2.5")])
    assert [f.figure for f in figures] == ["failover_time"]
    every = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(x["figure"], x["run_id"]) for x in every] == [
        ("before", ""),
        ("failover_time", "RUN1"),
    ]
    this_run = [json.loads(x) for x in (tmp_path / "RUN1.jsonl").read_text().splitlines()]
    assert [x["figure"] for x in this_run] == ["failover_time"]
    assert this_run[0]["median"] == 1.5
