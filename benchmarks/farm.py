"""Farm module figures: the cost of the VIP path, and how fast a dead node's buckets move.

Run on the lab with the demo site deployed (`make demo`), as root:
    python -m benchmarks.farm --runs 10 --takeover-runs 5

1. Requests per second from the client namespace, the same client (`threads` concurrent
   loops, a new connection per request: the farm hashes every SYN) for `--seconds` each:
   - `direct`: straight to node1's own address (10.77.0.11:8080), no farm in the path;
   - `vip_one`: through the VIP with node2 drained, so node1 serves every bucket: the same
     node and the same application as `direct`, only the path differs (virtual MAC,
     ARP answer, nftables hash and bucket lookup on every SYN, node2 dropping the
     flooded copies). `vip_path_cost` = 1 - vip_one / direct: the target is <= 10 %;
   - `vip_all`: through the VIP with every node UP (aggregate, and per node).
   The runs alternate direct / VIP (ABBA) so load from elsewhere on the host hits both
   alike; on a shared lab host (every node and the client on the same CPUs) the figures
   carry that noise: `host_cpus` and the load average are recorded with them.
2. Bucket takeover time: the last node is crashed while a probe opens a new connection
   through the VIP every 20 ms; the figure is the time from the crash to the first request
   after which every request succeeded (the survivors own the dead node's buckets). The
   node is booted again and the farm waits for every node UP before the next run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.report import Figure, emit
from ha_lab.farm_client import load, recovery
from ha_lab.lab import Lab
from ha_lab.observe import Probe, states_of, wait_for_states

TARGET_COST = 0.10
TIMEOUT_S = 1.0  # the lab's heartbeat timeout of the weather module (100 ms / 1 s)


def hactl(lab: Lab, node: str, *args: str) -> None:
    subprocess.run(lab.exec_argv(node, ["hactl", *args]), check=True, capture_output=True)


def all_up(module: str, timeout: float = 120.0) -> list[str]:
    nodes = sorted(states_of(module))
    states = wait_for_states(module, dict.fromkeys(nodes, "UP"), timeout)
    if len(nodes) < 2 or set(states.values()) != {"UP"}:
        raise SystemExit(f"{module} is not UP on every node ({states}); deploy first: make demo")
    return nodes


def throughput(lab: Lab, args: argparse.Namespace, nodes: list[str]) -> list[Figure]:
    first, others = nodes[0], nodes[1:]
    direct_addr = lab.describe()["nodes"][0]["addresses"]["lan"]
    direct: list[float] = []
    vip_one: list[float] = []
    vip_all: list[float] = []
    failures = 0

    def measure(host: str, into: list[float]) -> None:
        nonlocal failures
        r = load(host, args.port, threads=args.threads, duration=args.seconds)
        failures += r["failures"]
        into.append(r["rps"])

    # node1 alone behind the VIP for the whole comparison (one drain, not one per run), and
    # the two paths measured in alternating order (ABBA), so load from elsewhere on the host
    # hits both alike; each run's cost is judged against its own direct measurement.
    for node in others:
        hactl(lab, node, "drain", args.module)
    try:
        for run in range(args.runs):
            order = [(direct_addr, direct), (args.vip, vip_one)]
            for host, into in order if run % 2 == 0 else order[::-1]:
                measure(host, into)
            print(f"run {run}: direct {direct[-1]:.0f}/s, VIP ({first} alone) {vip_one[-1]:.0f}/s",
                  file=sys.stderr)  # fmt: skip
    finally:
        for node in others:
            hactl(lab, node, "undrain", args.module)
    all_up(args.module)
    for _run in range(args.runs):
        measure(args.vip, vip_all)
    costs = [1 - v / d for v, d in zip(vip_one, direct, strict=True)]
    load_avg = Path("/proc/loadavg").read_text().split()[0]
    common = {
        "threads": args.threads,
        "seconds": args.seconds,
        "new_connection_per_request": True,
        "host_cpus": os.cpu_count(),
        "host_load_1m_after": float(load_avg),
    }
    cost = Figure(
        "farm", "vip_path_cost", "fraction", costs, target=f"median <= {TARGET_COST}",
        extra={**common, "failed_requests": failures},
    )  # fmt: skip
    cost.passed = failures == 0 and cost.median <= TARGET_COST
    anchor = f"direct_rps_{first}"  # the same node's own address, no farm in the path
    return [
        Figure("farm", anchor, "req/s", direct, extra=common),
        Figure("farm", f"vip_rps_{first}_alone", "req/s", vip_one, extra=common, anchor=anchor),
        Figure(
            "farm",
            "vip_rps_all_nodes",
            "req/s",
            vip_all,
            extra={**common, "nodes": nodes},
            anchor=anchor,
        ),
        Figure(
            "farm",
            "vip_rps_per_node",
            "req/s",
            [v / len(nodes) for v in vip_all],
            extra={**common, "nodes": nodes},
            anchor=anchor,
        ),
        cost,
    ]


def takeover(lab: Lab, args: argparse.Namespace, nodes: list[str]) -> Figure:
    victim = nodes[-1]
    samples: list[float] = []
    failed = 0
    probe = Probe(args.vip, port=args.port, path="/", duration=args.takeover_runs * 300.0).start()
    try:
        for run in range(args.takeover_runs):
            all_up(args.module)
            if probe.wait_served_by(victim, after=time.monotonic(), timeout=10) is None:
                raise SystemExit(f"the probe never reached {victim} through the VIP")
            crashed_at = time.monotonic()
            lab.crash(victim)
            time.sleep(args.observe)
            recovered, by = recovery(probe.snapshot(), crashed_at, time.monotonic())
            if recovered is None or victim in by:
                failed += 1
                print(f"run {run}: not recovered ({by})", file=sys.stderr)
            else:
                samples.append(recovered - crashed_at)
                print(f"run {run}: {victim} crashed, every request served again after "
                      f"{samples[-1]:.2f} s by {sorted(by)}", file=sys.stderr)  # fmt: skip
            lab.boot(victim)
    finally:
        probe.stop()
    all_up(args.module)
    limit = TIMEOUT_S + 2
    fig = Figure(
        "farm", "bucket_takeover_time", "s", samples, target=f"median <= {limit:g}",
        extra={"failed_runs": failed, "heartbeat": "100 ms / 1 s", "crashed": victim,
               "probe": "new connection every 20 ms, 250 ms timeout"},
    )  # fmt: skip
    fig.passed = failed == 0 and bool(samples) and fig.median <= limit
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--module", default="weather")
    parser.add_argument("--vip", default="10.77.0.200")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--observe", type=float, default=5.0)
    parser.add_argument("--takeover-runs", type=int, default=5)
    parser.add_argument("--skip-takeover", action="store_true")
    args = parser.parse_args(argv)
    lab = Lab()
    nodes = all_up(args.module)
    figures = throughput(lab, args, nodes)
    if not args.skip_takeover:
        figures.append(takeover(lab, args, nodes))
    emit(figures)
    return 0 if all(f.passed is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
