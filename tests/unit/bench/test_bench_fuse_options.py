"""benchmarks/fuse_options.py: figures and side-by-side ratios from one run's rounds."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchmarks.fuse_options import figures_of


def _round(plain: tuple[float, float], wb: tuple[float, float]) -> dict[str, dict[str, object]]:
    return {
        "plain": {"mbps": plain[0], "ops": plain[1], "sizes": {"1048576": 64}},
        "writeback": {"mbps": wb[0], "ops": wb[1], "sizes": {"1048576": 64}},
    }


def test_ratios_are_per_round_writeback_over_plain() -> None:
    figs = {
        f.figure: f
        for f in figures_of([_round((400, 1000), (200, 1500)), _round((800, 2000), (800, 1000))])
    }
    assert figs["1m_sequential_ratio_writeback_to_plain"].samples == [0.5, 1.0]
    assert figs["4k_fdatasync_ratio_writeback_to_plain"].samples == [1.5, 0.5]
    assert figs["4k_fdatasync_writeback"].anchor == "4k_fdatasync_plain"
    assert figs["1m_sequential_plain"].samples == [400.0, 800.0]


def test_a_round_with_a_zero_plain_figure_gives_no_ratio() -> None:
    figs = {f.figure: f for f in figures_of([_round((0, 1000), (200, 1500))])}
    assert figs["1m_sequential_ratio_writeback_to_plain"].samples == []
