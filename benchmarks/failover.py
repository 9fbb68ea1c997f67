"""Failover time: primary node crashed -> first request served through the VIP again.

Run on the lab with the demo site deployed (`make demo`):
    python -m benchmarks.failover --runs 10
Each run crashes the current primary (`ha-lab crash`, a power cut), measures from the
crash to the first answer from the other node through the VIP, as seen by a client
probing every 20 ms from the client namespace, then boots the node again and waits
for the pair to be PRIM/SECOND before the next run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from benchmarks.mirror_lab import arguments, steady_pair
from benchmarks.report import Figure, emit
from ha_lab.lab import Lab
from ha_lab.observe import Probe

TARGET_MEDIAN_S = 2.5  # with the 100 ms / 1 s heartbeat profile


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(__doc__ or "", argv)
    lab = Lab()
    samples: list[float] = []
    failures = 0
    probe = Probe(args.vip, port=args.port, duration=args.runs * 300.0).start()
    try:
        for run in range(args.runs):
            primary, secondary = steady_pair(args.module)
            crashed_at = time.monotonic()
            lab.crash(primary)
            served = probe.wait_served_by(secondary, after=crashed_at, timeout=60)
            if served is None:
                failures += 1
                print(f"run {run}: {secondary} never served the VIP", file=sys.stderr)
            else:
                samples.append(served - crashed_at)
                print(f"run {run}: {primary} crashed, {secondary} served after "
                      f"{samples[-1]:.2f} s", file=sys.stderr)  # fmt: skip
            lab.boot(primary)
    finally:
        probe.stop()
    figure = Figure(
        benchmark="failover",
        figure="failover_time",
        unit="s",
        samples=samples,
        target=f"median <= {TARGET_MEDIAN_S}",
        extra={
            "failed_runs": failures,
            "probe_bad_lines": probe.stream.bad_lines,
            "heartbeat": "100 ms / 1 s",
        },
    )
    figure.passed = failures == 0 and figure.median <= TARGET_MEDIAN_S
    emit([figure])
    return 0 if figure.passed else 1


if __name__ == "__main__":
    sys.exit(main())
