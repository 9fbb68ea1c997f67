"""benchmarks/fuse_compiled.py: figures and per-round ratios to the runtime's FUSE layer."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchmarks.fuse_compiled import PLACES, figures_of


def _round(scale: float) -> dict[str, dict[str, float]]:
    base = {"local": 4.0, "pyfuse3": 1.0, "pyfuse3_bare": 1.5, "c_single": 2.0, "c_threads": 3.0}
    return {
        p: {"4k_fdatasync": base[p] * scale, "1m_sequential": 100 * base[p],
            "sqlite_commits": 10 * base[p] * scale}
        for p in PLACES
    }  # fmt: skip


def test_every_place_is_anchored_on_local_and_ratios_are_per_round() -> None:
    figs = {f.figure: f for f in figures_of([_round(1.0), _round(2.0)])}
    assert figs["4k_fdatasync_local"].anchor == ""
    assert figs["4k_fdatasync_pyfuse3"].anchor == "4k_fdatasync_local"
    assert figs["sqlite_commits_c_single"].samples == [20.0, 40.0]
    # each round's compiled figure over the same round's pyfuse3 one, not medians over medians
    assert figs["4k_fdatasync_c_single_over_pyfuse3"].samples == [2.0, 2.0]
    assert figs["1m_sequential_c_threads_over_pyfuse3"].samples == [3.0, 3.0]
    assert figs["sqlite_commits_c_threads_over_pyfuse3"].unit == "x"
