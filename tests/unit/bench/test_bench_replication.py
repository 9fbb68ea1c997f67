"""benchmarks/replication.py: figures from the rows of one run (no lab needed)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchmarks.replication import BOTH_NODES, FUSE_ONLY, figures_of


def rows(both: bool = True, cpu: bool = True, fuse: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    places = (("local", 1.0), (FUSE_ONLY, 0.5), ("replicated", 0.25))
    for run in range(2):
        for where, k in places if fuse else (places[0], places[2]):
            c: dict[str, float | None] = {"cpu_primary_s": None, "cpu_secondary_s": None}
            if cpu and where == "replicated":
                c = {"cpu_primary_s": 0.6 * k, "cpu_secondary_s": 0.3 * k, "cpu_fuse_only_s": 0.0}
            if cpu and where == FUSE_ONLY:
                c = {**c, "cpu_fuse_only_s": 0.1}
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


def test_fuse_only_gives_the_ceiling_and_the_share_replication_keeps() -> None:
    f = by_name(figures_of(rows(), {"seconds": 3.0}))
    assert f["1m_sequential_fuse_only"].anchor == "1m_sequential_local"
    assert f["1m_sequential_fuse_only"].samples == [400.0, 400.0]
    ceiling = f["1m_sequential_ratio_fuse_only"]
    assert ceiling.unit == "fuse_only/local" and ceiling.median == pytest.approx(0.5)
    kept = f["4k_fdatasync_ratio_to_fuse_only"]
    assert kept.unit == "repl/fuse_only" and kept.median == pytest.approx(0.5)
    assert not ceiling.target and ceiling.passed is None  # the target stays on repl/local
    # 0.1 s of the FUSE-only process over 1,500 ops (4 KiB) and over 256 MiB
    assert f["4k_fdatasync_cpu_fuse_only"].samples == [pytest.approx(100 / 1500)] * 2
    assert f["1m_sequential_cpu_fuse_only"].samples == [pytest.approx(100 / 256)] * 2
    assert f["4k_fdatasync_p99_fuse_only"].anchor == "4k_fdatasync_p99_local"
    names = by_name(figures_of(rows(fuse=False), {"seconds": 3.0}))
    assert not any("fuse" in n for n in names) and "1m_sequential_ratio" in names
