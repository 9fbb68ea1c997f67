"""benchmarks/link_paths.py: its figures from one run's rows (no TLS, no trio here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchmarks.link_paths import PATHS, figures_of


def test_each_round_pairs_the_paths_whatever_ran_first() -> None:
    rows = []
    for r, (old, new, inline) in enumerate(((1000, 800, 400), (1200, 600, 600), (900, 900, 450))):
        order = PATHS if r % 2 == 0 else PATHS[::-1]  # as main alternates them
        by_path = {"sslstream": old, "direct": new, "inline": inline}
        rows += [{"path": p, "cpu_us": by_path[p], "wall_us": 2 * by_path[p]} for p in order]
    f = {x.figure: x for x in figures_of(rows, {})}
    assert f["cpu_direct_over_sslstream"].samples == [
        pytest.approx(0.8), pytest.approx(0.5), pytest.approx(1.0)
    ]  # fmt: skip
    assert f["cpu_direct_over_sslstream"].median == pytest.approx(0.8)
    assert f["wall_per_op_direct"].anchor == "wall_per_op_sslstream"
    assert f["wall_per_op_sslstream"].samples == [2000, 2400, 1800]
    assert f["cpu_inline_over_direct"].samples == [
        pytest.approx(0.5), pytest.approx(1.0), pytest.approx(0.5)
    ]  # fmt: skip
    assert f["cpu_per_op_inline"].anchor == "cpu_per_op_direct"
