"""Figures as JSON lines (machine-readable, appended to benchmarks/results/) and a table.

`benchmarks.run_all` runs every benchmark in one process inside `collecting(run_id)`:
each figure emitted meanwhile carries that run id in its JSON line and is also handed to
the collector, so the report is built from the figures of that run only.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (run id, figures emitted so far) while benchmarks.run_all runs; empty otherwise.
_collectors: list[tuple[str, list[Figure]]] = []


@dataclass
class Figure:
    benchmark: str
    figure: str
    unit: str
    samples: list[float]
    target: str = ""
    passed: bool | None = None
    extra: dict[str, object] = field(default_factory=dict)
    # The figure of the same benchmark, measured in the same run, that this one is
    # compared with (local-disk writes, rsync, a node's direct address); "" for none.
    anchor: str = ""
    run_id: str = ""

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


@contextmanager
def collecting(run_id: str) -> Iterator[list[Figure]]:
    """Stamp run_id on every figure emitted inside, and gather them in the list yielded."""
    figures: list[Figure] = []
    _collectors.append((run_id, figures))
    try:
        yield figures
    finally:
        _collectors.pop()


def emit(figures: Sequence[Figure]) -> None:
    """Print JSON lines then a table; keep the JSON lines in benchmarks/results/.

    results.jsonl is append-only; inside `collecting(run_id)` the lines also go to
    results/<run_id>.jsonl.
    """
    RESULTS_DIR.mkdir(exist_ok=True)
    run_id, collected = _collectors[-1] if _collectors else ("", None)
    logs = [RESULTS_DIR / "results.jsonl"]
    if run_id:
        logs.append(RESULTS_DIR / f"{run_id}.jsonl")
    lines = []
    for fig in figures:
        fig.run_id = fig.run_id or run_id
        lines.append(fig.as_json())
        print(lines[-1])
    for path in logs:
        with path.open("a") as log:
            log.writelines(line + "\n" for line in lines)
    if collected is not None:
        collected.extend(figures)
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
