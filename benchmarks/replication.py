"""Replicated writes against the same writes on the node's local disk, side by side.

Run on the lab with the demo site deployed (`make demo`), as root:
    python -m benchmarks.replication [--runs 3] [--seconds 3]

On the module's primary, one script runs each workload alternately in the replicated
directory (the FUSE mount, synchronous replication to the secondary, ack `durable`) and
in a local directory on the same disk (/var/tmp), `--runs` times each:

- `4k_fdatasync`: 4 KiB write at the end of a file, then fdatasync, in a loop for
  `--seconds`: operations/s and the p99 latency of one write+fdatasync;
- `1m_sequential`: 256 MiB written 1 MiB at a time, then fsync: MB/s;
- `sqlite_commits`: the demo application's workload (flightdata: journal_mode=DELETE,
  synchronous=FULL, one INSERT per transaction) for `--seconds`: commits/s.

Targets (issue 4): replicated >= 40 % of local for the first two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.mirror_lab import steady_pair
from benchmarks.report import Figure, emit, percentile
from ha_lab.lab import Lab

TARGET_RATIO = 0.40

NODE_SCRIPT = r"""
import json, os, sqlite3, sys, time
d, workload, seconds, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
block = os.urandom(4096)
mib = os.urandom(1 << 20)

def small(d):
    p = os.path.join(d, "bench-4k")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    while time.time() < start_at:  # the same instant on both nodes (one host clock)
        time.sleep(0.001)
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        os.write(fd, block)
        os.fdatasync(fd)
        lat.append(time.perf_counter() - t)
    os.close(fd)
    os.unlink(p)
    return {"ops": len(lat) / seconds, "lat": lat}

def sequential(d):
    p = os.path.join(d, "bench-1m")
    t = time.perf_counter()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for _ in range(256):
        os.write(fd, mib)
    os.fsync(fd)
    os.close(fd)
    took = time.perf_counter() - t
    os.unlink(p)
    return {"mbps": 256 * (1 << 20) / 1e6 / took, "mib": 256}

def sqlite(d):
    p = os.path.join(d, "bench.db")
    db = sqlite3.connect(p, isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY AUTOINCREMENT,"
               " created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),"
               " body TEXT NOT NULL)")
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        db.execute("BEGIN IMMEDIATE")
        body = '{"seq": %d, "flight": "AF1234"}' % n
        db.execute("INSERT INTO records (body) VALUES (?)", (body,))
        db.execute("COMMIT")
        n += 1
    db.close()
    os.unlink(p)
    return {"commits": n / seconds}

os.makedirs(d, exist_ok=True)
run = {"4k_fdatasync": small, "1m_sequential": sequential, "sqlite_commits": sqlite}[workload]
print(json.dumps(run(d)))
"""

WORKLOADS = ("4k_fdatasync", "1m_sequential", "sqlite_commits")
# The other node runs the same local loop at the same time: the lab's two nodes have their
# disks on one host disk, so a replicated fsync (both nodes' fdatasync at once) can never
# beat this, whatever the replicator does. An extra anchor, beside the target's.
BOTH_NODES = "local_both_nodes"


def _cpu_seconds(pids: Sequence[int]) -> float | None:
    total = 0.0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
    return total if pids else None


def replica_pids(node: str, role: str, module: str) -> list[int]:
    """Host PIDs of the node's `hactl replicate ROLE MODULE` children (its PID namespace only:
    the host may run other copies, e.g. integration tests)."""
    init = Lab().node(node).init_pid()
    if init is None:
        return []
    ns = os.readlink(f"/proc/{init}/ns/pid")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if os.readlink(entry / "ns/pid") != ns:
                continue
        except OSError:
            continue
        if b"replicate" in argv and role.encode() in argv and module.encode() in argv:
            found.append(int(entry.name))
    return found


def _node_run(
    node: str, args: argparse.Namespace, d: str, workload: str, start_at: float = 0.0
) -> subprocess.Popen[str]:
    argv = ["python3", "-c", NODE_SCRIPT, d, workload, str(args.seconds), str(start_at)]
    return subprocess.Popen(Lab().exec_argv(node, argv), stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"node script failed ({proc.returncode})")
    return dict(json.loads(out))


def measure(args: argparse.Namespace, primary: str, secondary: str) -> list[dict[str, Any]]:
    """Rows: each workload, local then replicated, per run, with the CPU time the primary's
    and the secondary's replication processes spent meanwhile; then the 4 KiB loop on both
    nodes' local disks at once."""
    pids = {
        "primary": replica_pids(primary, "primary", args.module),
        "secondary": replica_pids(secondary, "secondary", args.module),
    }
    rows: list[dict[str, Any]] = []
    for run in range(args.runs):
        for where, d in (("local", args.local), ("replicated", f"{args.dir}/.bench")):
            for workload in WORKLOADS:
                before = {k: _cpu_seconds(v) for k, v in pids.items()}
                row = _result(_node_run(primary, args, d, workload))
                for k, v in pids.items():
                    after = _cpu_seconds(v)
                    b = before[k]
                    row[f"cpu_{k}_s"] = None if after is None or b is None else after - b
                rows.append({"run": run, "where": where, "workload": workload, **row})
        start_at = time.time() + 1.5  # both node scripts are up by then
        mine = _node_run(primary, args, args.local, "4k_fdatasync", start_at)
        peer = _node_run(secondary, args, args.local, "4k_fdatasync", start_at)
        row, peer_row = _result(mine), _result(peer)
        rows.append({"run": run, "where": BOTH_NODES, "workload": "4k_fdatasync", **row,
                     "peer_ops": peer_row["ops"]})  # fmt: skip
    return rows


def figures_of(rows: list[dict[str, Any]], extra: dict[str, Any]) -> list[Figure]:
    def pick(workload: str, where: str, key: str) -> list[float]:
        return [float(r[key]) for r in rows if r["workload"] == workload and r["where"] == where]

    figures: list[Figure] = []
    for workload, key, unit in (
        ("4k_fdatasync", "ops", "ops/s"),
        ("1m_sequential", "mbps", "MB/s"),
        ("sqlite_commits", "commits", "commits/s"),
    ):
        local = Figure(
            "replication", f"{workload}_local", unit, pick(workload, "local", key), extra=extra
        )
        repl = Figure(
            "replication",
            f"{workload}_replicated",
            unit,
            pick(workload, "replicated", key),
            extra=extra,
            anchor=local.figure,  # the same workload on the node's local disk
        )
        ratio = Figure(
            "replication",
            f"{workload}_ratio",
            "repl/local",
            [r / max(loc, 1e-9) for r, loc in zip(repl.samples, local.samples, strict=True)],
        )
        if workload != "sqlite_commits":
            ratio.target = f">= {TARGET_RATIO:.2f}"
            ratio.passed = ratio.median >= TARGET_RATIO
        figures += [local, repl, ratio]
        if workload == "4k_fdatasync" and pick(workload, BOTH_NODES, key):
            both = Figure(
                "replication",
                "4k_fdatasync_local_both_nodes",
                unit,
                pick(workload, BOTH_NODES, key),
                extra={
                    **extra,
                    "what": "local loop on the primary while the secondary runs it too "
                    "(the lab's nodes share one host disk); not the target's anchor",
                    "secondary_ops": pick(workload, BOTH_NODES, "peer_ops"),
                },
            )
            figures += [
                both,
                Figure(
                    "replication",
                    "4k_fdatasync_ratio_both_nodes",
                    "repl/local_both_nodes",
                    [r / max(b, 1e-9) for r, b in zip(repl.samples, both.samples, strict=True)],
                    # Already a ratio (its unit names the anchor): an anchor here made the
                    # report divide it again ("ratio to anchor" 0.00).
                ),
            ]

    def count(r: dict[str, Any]) -> float:  # 4 KiB operations, or MiB written
        return float(len(r["lat"]) if "lat" in r else r["mib"])

    for workload, unit in (("4k_fdatasync", "ms/op"), ("1m_sequential", "ms/MiB")):
        for proc in ("primary", "secondary"):
            key = f"cpu_{proc}_s"
            samples = [
                float(r[key]) * 1000 / count(r)
                for r in rows
                if r["workload"] == workload and r["where"] == "replicated"
                and r.get(key) is not None
            ]  # fmt: skip
            if samples:
                figures.append(
                    Figure(
                        "replication",
                        f"{workload}_cpu_{proc}",
                        unit,
                        samples,
                        extra={"what": f"CPU time of the {proc}'s replication process(es)"},
                    )
                )
    for where in ("local", "replicated", BOTH_NODES):
        lat = [
            x * 1000
            for r in rows
            if r["workload"] == "4k_fdatasync" and r["where"] == where
            for x in r["lat"]
        ]
        if not lat:
            continue
        figures.append(
            Figure(
                "replication",
                f"4k_fdatasync_p99_{where}",
                "ms",
                [percentile(lat, 99)],
                extra={"p50_ms": percentile(lat, 50), "ops": len(lat)},
                anchor="4k_fdatasync_p99_local" if where == "replicated" else "",
            )
        )
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--module", default="flightdata")
    parser.add_argument("--dir", default="/var/lib/flightdata", help="a replicated directory")
    parser.add_argument("--local", default="/var/tmp/hapair-bench")
    args = parser.parse_args(argv)
    primary, secondary = steady_pair(args.module)
    try:
        rows = measure(args, primary, secondary)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        print(f"replication benchmark: {e}", file=sys.stderr)
        return 1
    finally:
        for node, gone in (
            (primary, [f"{args.dir}/.bench", args.local]),
            (secondary, [args.local]),
        ):
            subprocess.run(Lab().exec_argv(node, ["rm", "-rf", *gone]), check=False)
    extra = {"primary": primary, "secondary": secondary, "seconds": args.seconds}
    figures = figures_of(rows, extra)
    emit(figures)
    return 0 if all(f.passed is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
