"""Switchover downtime: `hactl swap` on the primary, longest gap a client sees.

Run on the lab with the demo site deployed (`make demo`):
    python -m benchmarks.switchover --runs 10
A client probes the VIP every 20 ms from the client namespace; the downtime of a run is
the longest interval without a successful answer around the swap (so it includes the
probe's own 20 ms spacing: an uninterrupted service reads about 0.02 s).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks.mirror_lab import arguments, steady_pair
from benchmarks.report import Figure, emit
from ha_lab.lab import Lab
from ha_lab.observe import Probe, longest_outage

TARGET_MEDIAN_S = 1.5


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(__doc__ or "", argv)
    lab = Lab()
    samples: list[float] = []
    failures = 0
    probe = Probe(args.vip, port=args.port, duration=args.runs * 300.0).start()
    try:
        for run in range(args.runs):
            primary, secondary = steady_pair(args.module)
            time.sleep(0.5)  # a stretch of successful answers before the swap
            started = time.monotonic()
            swap = subprocess.run(
                lab.exec_argv(primary, ["hactl", "swap", args.module]),
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            served = probe.wait_served_by(secondary, after=started, timeout=60)
            if swap.returncode != 0 or served is None:
                failures += 1
                print(f"run {run}: swap failed: {swap.stderr.strip()}", file=sys.stderr)
                continue
            time.sleep(0.5)
            outage = longest_outage(probe.snapshot(), started - 0.5, served + 0.5)
            samples.append(outage)
            print(f"run {run}: {primary} -> {secondary}, downtime {outage:.3f} s", file=sys.stderr)
    finally:
        probe.stop()
    figure = Figure(
        benchmark="switchover",
        figure="switchover_downtime",
        unit="s",
        samples=samples,
        target=f"median <= {TARGET_MEDIAN_S}",
        extra={
            "failed_runs": failures,
            "probe_bad_lines": probe.stream.bad_lines,
            "probe_interval_s": 0.02,
        },
    )
    figure.passed = failures == 0 and figure.median <= TARGET_MEDIAN_S
    emit([figure])
    return 0 if figure.passed else 1


if __name__ == "__main__":
    sys.exit(main())
