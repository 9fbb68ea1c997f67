"""benchmarks/replication.py: figures from the rows of one run (no lab needed)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.replication import BOTH_NODES, figures_of


def rows(both: bool = True, cpu: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for run in range(2):
        for where, k in (("local", 1.0), ("replicated", 0.25)):
            c = {"cpu_primary_s": 0.6 * k, "cpu_secondary_s": 0.3 * k} if cpu else {}
            if where == "local" or not cpu:
                c = {"cpu_primary_s": None, "cpu_secondary_s": None}
            out += [
                {"run": run, "where": where, "workload": "4k_fdatasync", "ops": 1000 * k,
                 "lat": [0.001 / k] * int(3000 * k), **c},
                {"run": run, "where": where, "workload": "1m_sequential", "mbps": 800 * k,
                 "mib": 256, **c},
                {"run": run, "where": where, "workload": "sqlite_commits", "commits": 500 * k, **c},
            ]  # fmt: skip
        if both:
            out.append({"run": run, "where": BOTH_NODES, "workload": "4k_fdatasync",
                        "ops": 500.0, "lat": [0.002] * 1500, "peer_ops": 480.0})  # fmt: skip
    return out


def by_name(figs: list[Any]) -> dict[str, Any]:
    return {f.figure: f for f in figs}


def test_target_ratios_keep_the_local_disk_anchor() -> None:
    f = by_name(figures_of(rows(), {"seconds": 3.0}))
    assert f["4k_fdatasync_replicated"].anchor == "4k_fdatasync_local"
    assert f["4k_fdatasync_ratio"].median == pytest.approx(0.25)
    assert f["4k_fdatasync_ratio"].target == ">= 0.40" and f["4k_fdatasync_ratio"].passed is False
    assert f["1m_sequential_ratio"].median == pytest.approx(0.25)
    assert f["sqlite_commits_ratio"].passed is None


def test_both_nodes_anchor_is_extra_and_labelled() -> None:
    f = by_name(figures_of(rows(), {"seconds": 3.0}))
    both = f["4k_fdatasync_local_both_nodes"]
    assert both.samples == [500.0, 500.0] and both.extra["secondary_ops"] == [480.0, 480.0]
    assert "share one host disk" in str(both.extra["what"])
    r = f["4k_fdatasync_ratio_both_nodes"]
    assert r.unit == "repl/local_both_nodes" and not r.anchor  # a ratio, not divided again
    assert r.median == pytest.approx(0.5) and r.passed is None
    assert f["4k_fdatasync_p99_local_both_nodes"].samples == [pytest.approx(2.0)]
    # Without the probe's rows there is no such figure, the target's anchor stays.
    names = by_name(figures_of(rows(both=False), {"seconds": 3.0}))
    assert "4k_fdatasync_local_both_nodes" not in names and "4k_fdatasync_ratio" in names


def test_cpu_per_operation_and_per_mib_of_each_replication_process() -> None:
    f = by_name(figures_of(rows(), {"seconds": 3.0}))
    # 0.15 s of the primary's CPU over 750 replicated 4 KiB ops; 0.075 s over 256 MiB
    assert f["4k_fdatasync_cpu_primary"].samples == [pytest.approx(0.2)] * 2
    assert f["4k_fdatasync_cpu_secondary"].unit == "ms/op"
    assert f["1m_sequential_cpu_secondary"].samples == [pytest.approx(75 / 256)] * 2
    assert f["1m_sequential_cpu_primary"].unit == "ms/MiB"
    assert not any("cpu" in n for n in by_name(figures_of(rows(cpu=False), {"seconds": 3.0})))
