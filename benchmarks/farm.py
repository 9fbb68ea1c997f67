"""Farm module figures: the cost of the VIP path, and how fast a dead node's buckets move.

Run on the lab with the demo site deployed (`make demo`), as root:
    python -m benchmarks.farm --runs 6 --seconds 10 --takeover-runs 5

1. Requests per second from the client namespace (`threads` concurrent loops, a new
   connection per request: the farm hashes every SYN), node2 drained so that node1 serves
   every bucket of the VIP:
   - `direct`: straight to node1's own address (10.77.0.11:8080), no farm in the path;
   - `vip`: through the VIP: the same node, the same application, only the path differs
     (virtual MAC flooded to every node, nftables hash and bucket lookup on every SYN,
     conntrack, node2 dropping its copies of every packet).
   Both paths are measured by ONE client process in alternating slices of `--slice`
   seconds (direct, VIP, VIP, direct, ...: ABBA), so that the load of everything else on
   this shared host (the nodes, the client and other sessions all share its CPUs) hits
   both paths alike at the scale of a second. Each adjacent direct/VIP pair of slices is
   one paired sample, cost = 1 - vip/direct; `vip_path_cost` is the median of these paired
   costs over `--runs` client runs of `--seconds` per path each (the first pair of every
   run is a discarded warm-up: threads starting, ARP). Its extra fields also give the
   cost from the totals (1 - all VIP requests / all direct requests, same time on each),
   a distribution-free 95 % confidence interval of the median, and the cost of each run.
   The target is median <= 10 %. `direct_rps_*` and `vip_rps_*_alone` are the per-slice
   rates (req/s) of those pairs. On this host a VIP packet is also processed by node2 (it
   receives every frame to the virtual MAC and drops what is not its own), on the same
   CPUs: work a real farm does on another machine is counted here as VIP path cost.
   - `vip_all`: through the VIP with every node UP (aggregate, and per node), `--runs`
     runs of `--seconds`, not paired.
2. Bucket takeover time: the last node is crashed while a probe opens a new connection
   through the VIP every 20 ms; the figure is the time from the crash to the first request
   after which every request succeeded (the survivors own the dead node's buckets). The
   node is booted again and the farm waits for every node UP before the next run.

`python -m benchmarks.farm client ...` is the client side of 1 (run in the client
namespace through `Lab.client_argv`); it prints one JSON line of per-slice counts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import Figure, emit
from ha_lab.farm_client import load, recovery
from ha_lab.lab import Lab
from ha_lab.observe import Probe, states_of, wait_for_states

TARGET_COST = 0.10
TIMEOUT_S = 1.0  # the lab's heartbeat timeout of the weather module (100 ms / 1 s)
WARMUP_PAIRS = 1  # per client run, discarded
_LINGER_RESET = struct.pack("ii", 1, 0)


def hactl(lab: Lab, node: str, *args: str) -> None:
    subprocess.run(lab.exec_argv(node, ["hactl", *args]), check=True, capture_output=True)


def all_up(module: str, timeout: float = 120.0) -> list[str]:
    nodes = sorted(states_of(module))
    states = wait_for_states(module, dict.fromkeys(nodes, "UP"), timeout)
    if len(nodes) < 2 or set(states.values()) != {"UP"}:
        raise SystemExit(f"{module} is not UP on every node ({states}); deploy first: make demo")
    return nodes


# ------------------------------------------------------------- client side (client netns)


def slice_target(k: int) -> int:
    """Path of slice k: 0 = direct, 1 = VIP, in ABBA order (pair p = slices 2p, 2p+1), so
    neither path always comes first after a pair boundary."""
    pair, second = divmod(k, 2)
    return second ^ (pair % 2)


def _request(host: str, port: int, timeout: float) -> bool:
    """GET / on a new connection, closed with a reset (SO_LINGER 0) so that thousands of
    connections do not fill the client's ports with TIME_WAIT (as ha_lab.farm_client.load)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
    except (OSError, http.client.HTTPException):
        return False
    else:
        return response.status == 200
    finally:
        conn.close()


def run_client(a: argparse.Namespace) -> None:
    """`threads` loops; each request goes to the path of the slice it starts in and counts
    there (a request started near the end of a slice borrows a few ms of the next one; with
    ABBA order that evens out between the paths)."""
    hosts = (a.direct, a.vip)
    slices = 2 * (a.pairs + WARMUP_PAIRS)
    ok = [[0] * slices for _ in range(a.threads)]
    failed = [[0] * slices for _ in range(a.threads)]
    barrier = threading.Barrier(a.threads + 1)
    start = [0.0]

    def worker(i: int) -> None:
        barrier.wait()
        while (k := int((time.monotonic() - start[0]) / a.slice)) < slices:
            if _request(hosts[slice_target(k)], a.port, a.timeout):
                ok[i][k] += 1
            else:
                failed[i][k] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.threads)]
    for t in threads:
        t.start()
    start[0] = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join()
    out = {
        "slice_s": a.slice,
        "warmup_pairs": WARMUP_PAIRS,
        "targets": [slice_target(k) for k in range(slices)],
        "ok": [sum(row[k] for row in ok) for k in range(slices)],
        "failed": [sum(row[k] for row in failed) for k in range(slices)],
    }
    print(json.dumps(out))


# ------------------------------------------------------------------------- controller side


@dataclass
class Pair:
    direct_rps: float
    vip_rps: float

    @property
    def cost(self) -> float:
        return 1 - self.vip_rps / self.direct_rps if self.direct_rps else float("nan")


def paired_run(args: argparse.Namespace, direct: str) -> tuple[list[Pair], int]:
    """One client run alternating the two paths: its measured pairs and failed requests."""
    pairs = max(1, math.ceil(args.seconds / args.slice))
    argv = Lab.client_argv(
        [sys.executable, "-m", "benchmarks.farm", "client", "--direct", direct,
         "--vip", args.vip, "--port", str(args.port), "--threads", str(args.threads),
         "--slice", str(args.slice), "--pairs", str(pairs), "--timeout", "2"]
    )  # fmt: skip
    wall = 2 * (pairs + WARMUP_PAIRS) * args.slice
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=wall + 60, check=True)
    d = json.loads(proc.stdout)
    rates: list[list[float]] = [[], []]  # per path, in slice order, warm-up excluded
    skip = 2 * int(d["warmup_pairs"])
    for target, ok in zip(d["targets"][skip:], d["ok"][skip:], strict=True):
        rates[target].append(ok / float(d["slice_s"]))
    measured = [Pair(dr, vr) for dr, vr in zip(rates[0], rates[1], strict=True)]
    return measured, sum(d["failed"])


def median_ci95(samples: Sequence[float]) -> tuple[float, float]:
    """Distribution-free 95 % confidence interval of the median: order statistics j, k
    with P(j <= #below median < k) >= 0.95 under Binomial(n, 1/2)."""
    ordered = sorted(samples)
    n = len(ordered)
    if n < 6:  # no interval reaches 95 % below 6 samples
        return ordered[0], ordered[-1]
    cdf = 0.0
    j = 0
    while True:  # largest j with P(X < j) <= 2.5 %
        p = math.comb(n, j) / 2**n
        if cdf + p > 0.025:
            break
        cdf += p
        j += 1
    return ordered[max(j - 1, 0)], ordered[min(n - j, n - 1)]


def throughput(lab: Lab, args: argparse.Namespace, nodes: list[str]) -> list[Figure]:
    first, others = nodes[0], nodes[1:]
    direct_addr = lab.describe()["nodes"][0]["addresses"]["lan"]
    pairs: list[Pair] = []
    run_costs: list[float] = []
    vip_all: list[float] = []
    failures = 0

    # node1 alone behind the VIP for the whole comparison (one drain, not one per run).
    for node in others:
        hactl(lab, node, "drain", args.module)
    try:
        for run in range(args.runs):
            measured, failed = paired_run(args, direct_addr)
            failures += failed
            pairs += measured
            d = sum(p.direct_rps for p in measured)
            v = sum(p.vip_rps for p in measured)
            run_costs.append(1 - v / d)
            costs = sorted(p.cost for p in measured)
            print(f"run {run}: direct {d / len(measured):.0f}/s, VIP ({first} alone) "
                  f"{v / len(measured):.0f}/s, cost {run_costs[-1]:+.3f} from totals, "
                  f"median of {len(costs)} pairs {statistics.median(costs):+.3f}, "
                  f"failed {failed}", file=sys.stderr)  # fmt: skip
    finally:
        for node in others:
            hactl(lab, node, "undrain", args.module)
    all_up(args.module)
    for _run in range(args.runs):
        r = load(args.vip, args.port, threads=args.threads, duration=args.seconds)
        failures += r["failures"]
        vip_all.append(r["rps"])
    costs = [p.cost for p in pairs]
    total_direct = sum(p.direct_rps for p in pairs)
    total_vip = sum(p.vip_rps for p in pairs)
    lo, hi = median_ci95(costs)
    load_avg = Path("/proc/loadavg").read_text().split()[0]
    common = {
        "threads": args.threads,
        "new_connection_per_request": True,
        "host_cpus": os.cpu_count(),
        "host_load_1m_after": float(load_avg),
    }
    paired = {
        **common,
        "method": "one client alternating direct/VIP slices (ABBA); one sample per pair",
        "slice_s": args.slice,
        "client_runs": args.runs,
        "seconds_per_path_per_run": args.seconds,
        "warmup_pairs_discarded_per_run": WARMUP_PAIRS,
    }
    cost = Figure(
        "farm", "vip_path_cost", "fraction", costs, target=f"median <= {TARGET_COST}",
        extra={
            **paired,
            "failed_requests": failures,
            "median_ci95": [round(lo, 4), round(hi, 4)],
            "cost_from_totals": round(1 - total_vip / total_direct, 4),
            "cost_per_client_run": [round(c, 4) for c in run_costs],
            "pairs": len(costs),
        },
    )  # fmt: skip
    cost.passed = failures == 0 and cost.median <= TARGET_COST
    anchor = f"direct_rps_{first}"  # the same node's own address, no farm in the path
    unpaired = {**common, "seconds": args.seconds, "nodes": nodes}
    return [
        Figure("farm", anchor, "req/s", [p.direct_rps for p in pairs], extra=paired),
        Figure(
            "farm",
            f"vip_rps_{first}_alone",
            "req/s",
            [p.vip_rps for p in pairs],
            extra=paired,
            anchor=anchor,
        ),
        Figure("farm", "vip_rps_all_nodes", "req/s", vip_all, extra=unpaired, anchor=anchor),
        Figure(
            "farm",
            "vip_rps_per_node",
            "req/s",
            [v / len(nodes) for v in vip_all],
            extra=unpaired,
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
               "probe_bad_lines": probe.stream.bad_lines,
               "probe": "new connection every 20 ms, 250 ms timeout"},
    )  # fmt: skip
    fig.passed = failed == 0 and bool(samples) and fig.median <= limit
    return fig


def client_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="client side of the paired measurement")
    parser.add_argument("--direct", required=True)
    parser.add_argument("--vip", required=True)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--slice", type=float, default=0.5)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=2.0)
    run_client(parser.parse_args(argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=6, help="client runs (and vip_all runs)")
    parser.add_argument("--module", default="weather")
    parser.add_argument("--vip", default="10.77.0.200")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="per path, per run")
    parser.add_argument("--slice", type=float, default=0.5, help="alternation period (s)")
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
