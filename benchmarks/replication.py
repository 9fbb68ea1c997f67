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
import subprocess
import sys
from collections.abc import Sequence

from benchmarks.mirror_lab import steady_pair
from benchmarks.report import Figure, emit, percentile
from ha_lab.lab import Lab

TARGET_RATIO = 0.40

NODE_SCRIPT = r"""
import json, os, sqlite3, sys, time
replicated, local, runs, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
block = os.urandom(4096)
mib = os.urandom(1 << 20)

def small(d):
    p = os.path.join(d, "bench-4k")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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
    return {"mbps": 256 * (1 << 20) / 1e6 / took}

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

WORKLOADS = (("4k_fdatasync", small), ("1m_sequential", sequential), ("sqlite_commits", sqlite))
out = []
for run in range(runs):
    for where, d in (("local", local), ("replicated", replicated)):
        os.makedirs(d, exist_ok=True)
        for name, fn in WORKLOADS:
            out.append({"run": run, "where": where, "workload": name, **fn(d)})
print(json.dumps(out))
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--module", default="flightdata")
    parser.add_argument("--dir", default="/var/lib/flightdata", help="a replicated directory")
    parser.add_argument("--local", default="/var/tmp/hapair-bench")
    args = parser.parse_args(argv)
    primary, secondary = steady_pair(args.module)
    argv = Lab().exec_argv(
        primary,
        [
            "python3",
            "-c",
            NODE_SCRIPT,
            f"{args.dir}/.bench",
            args.local,
            str(args.runs),
            str(args.seconds),
        ],
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return 1
    rows = json.loads(proc.stdout)
    subprocess.run(
        Lab().exec_argv(primary, ["rm", "-rf", f"{args.dir}/.bench", args.local]), check=False
    )

    def pick(workload: str, where: str, key: str) -> list[float]:
        return [float(r[key]) for r in rows if r["workload"] == workload and r["where"] == where]

    extra = {"primary": primary, "secondary": secondary, "seconds": args.seconds}
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
    for where in ("local", "replicated"):
        lat = [
            x * 1000
            for r in rows
            if r["workload"] == "4k_fdatasync" and r["where"] == where
            for x in r["lat"]
        ]
        figures.append(
            Figure(
                "replication",
                f"4k_fdatasync_p99_{where}",
                "ms",
                [percentile(lat, 99)],
                extra={"p50_ms": percentile(lat, 50), "ops": len(lat)},
                anchor="" if where == "local" else "4k_fdatasync_p99_local",
            )
        )
    emit(figures)
    return 0 if all(f.passed is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
