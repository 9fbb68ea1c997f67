"""benchmarks/farm.py's paired measurement: slice order and the median's confidence interval."""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

import pytest

# benchmarks/ is a package of the repository, not of the installed project.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchmarks.farm import Pair, median_ci95, slice_target


def test_slices_alternate_abba_and_pair_one_direct_with_one_vip() -> None:
    order = [slice_target(k) for k in range(8)]
    assert order == [0, 1, 1, 0, 0, 1, 1, 0]
    for pair in range(50):  # every pair holds one slice of each path
        assert {slice_target(2 * pair), slice_target(2 * pair + 1)} == {0, 1}


def test_pair_cost() -> None:
    assert Pair(direct_rps=400.0, vip_rps=360.0).cost == pytest.approx(0.1)
    assert Pair(direct_rps=400.0, vip_rps=440.0).cost < 0


def test_median_ci95_uses_the_binomial_order_statistics() -> None:
    # Textbook ranks (1-based): n=10 -> 2nd and 9th; n=120 -> 49th and 72nd.
    assert median_ci95([float(x) for x in range(10)]) == (1.0, 8.0)
    assert median_ci95([float(x) for x in range(120)]) == (48.0, 71.0)
    assert median_ci95([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few: the whole range


def test_median_ci95_covers_the_true_median_about_95_percent_of_the_time() -> None:
    rng = random.Random(7)
    hits = 0
    for _ in range(400):
        lo, hi = median_ci95([rng.gauss(0.0, 1.0) for _ in range(40)])
        hits += lo <= 0.0 <= hi
        assert lo <= statistics.median([lo, hi]) <= hi
    assert 0.92 <= hits / 400 <= 0.995
