"""Figures as JSON lines (machine-readable, appended to benchmarks/results/) and a table."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Figure:
    benchmark: str
    figure: str
    unit: str
    samples: list[float]
    target: str = ""
    passed: bool | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def p95(self) -> float:
        return percentile(self.samples, 95)

    def as_json(self) -> str:
        data = asdict(self)
        data.update(median=self.median, p95=self.p95, runs=len(self.samples), ts=time.time())
        return json.dumps(data, sort_keys=True)


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: with few runs it reports a value that was really seen."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, round(pct / 100 * len(ordered) + 0.4999))
    return ordered[min(rank, len(ordered)) - 1]


def emit(figures: Sequence[Figure]) -> None:
    """Print JSON lines then a table; keep the JSON lines in benchmarks/results/."""
    RESULTS_DIR.mkdir(exist_ok=True)
    with (RESULTS_DIR / "results.jsonl").open("a") as log:
        for fig in figures:
            line = fig.as_json()
            print(line)
            log.write(line + "\n")
    print(table(figures))


def table(figures: Sequence[Figure]) -> str:
    header = f"{'figure':<38} {'median':>10} {'p95':>10} {'runs':>5}  {'target':<16} result"
    rows = [header, "-" * len(header)]
    for fig in figures:
        verdict = "-" if fig.passed is None else ("pass" if fig.passed else "FAIL")
        rows.append(
            f"{fig.figure + ' (' + fig.unit + ')':<38} {fig.median:>10.3f} {fig.p95:>10.3f} "
            f"{len(fig.samples):>5}  {fig.target:<16} {verdict}"
        )
    return "\n".join(rows)
