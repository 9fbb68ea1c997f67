"""Replicated writes against the same writes on the node's local disk, side by side.

Run on the lab with the demo site deployed (`make demo`), as root:
    python -m benchmarks.replication [--runs 3] [--seconds 3]

On the module's primary, one script runs each workload alternately in the replicated
directory (the FUSE mount, synchronous replication to the secondary, ack `durable`) and
in a local directory on the same disk (/var/tmp), `--runs` times each:

- `4k_fdatasync`: 4 KiB write at the end of a file, then fdatasync, in a loop for
  `--seconds`: operations/s and the p99 latency of one write+fdatasync;
- `1m_sequential`: 256 MiB written 1 MiB at a time, then fsync: MB/s;
- `sqlite_commits`: the demo application's workload (flightdata: locking_mode=EXCLUSIVE,
  journal_mode=WAL, synchronous=FULL, one INSERT per transaction) for `--seconds`:
  commits/s;
- `sqlite_delete_commits`: the same with the rollback journal (journal_mode=DELETE), the
  demo's setting until issue 16 and SQLite's default: what an application that keeps it
  gets.

Each run also writes through the runtime's own FUSE file system mounted over a local
directory with nothing replicated (`fuse_only`): the most any replication through the FUSE
layer can reach. `*_ratio_fuse_only` is that ceiling against the local disk, and
`*_ratio_to_fuse_only` what the replication itself keeps of it.

Targets (issue 4): replicated >= 40 % of local for the first two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.mirror_lab import steady_pair
from benchmarks.report import Figure, emit, percentile
from ha_lab.lab import Lab
from ha_lab.observe import module_states

TARGET_RATIO = 0.40
NODE_PYTHON = "/opt/hapair/venv/bin/python"  # the runtime's own (hapair_runtime_venv)

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

def sqlite(d, wal=True):
    p = os.path.join(d, "bench.db")
    db = sqlite3.connect(p, isolation_level=None)
    if wal:  # the demo application's settings (roles/flightdata/files/flightdata.py)
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
    else:
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
    for f in (p, p + "-wal"):
        if os.path.exists(f):
            os.unlink(f)
    return {"commits": n / seconds}

os.makedirs(d, exist_ok=True)
run = {"4k_fdatasync": small, "1m_sequential": sequential, "sqlite_commits": sqlite,
       "sqlite_delete_commits": lambda d: sqlite(d, wal=False)}[workload]
print(json.dumps(run(d)))
"""

WORKLOADS = ("4k_fdatasync", "1m_sequential", "sqlite_commits", "sqlite_delete_commits")
# The other node runs the same local loop at the same time: the lab's two nodes have their
# disks on one host disk, so a replicated fsync (both nodes' fdatasync at once) can never
# beat this, whatever the replicator does. An extra anchor, beside the target's.
BOTH_NODES = "local_both_nodes"
# The runtime's PassthroughFS on the primary, over a local directory, with a sink that only
# fsyncs locally (what a primary without a peer does): FUSE's own cost, without replication.
FUSE_ONLY = "fuse_only"
# The sink of a FUSE-only file system: records nothing, a barrier is the primary's own
# local half (also benchmarks/fuse_options.py). Expects `fusefs`, `os` and `backing`.
LOCAL_ONLY_SINK = r"""
class LocalOnly:
    async def before(self, rec):
        pass
    def after(self, rec):
        pass
    async def barrier(self, path, datasync):  # the primary's own local half of a barrier
        fusefs.fsync_backing(os.fsencode(backing.resolve()), path, datasync)
"""
FUSE_SCRIPT = (
    r"""
import functools, os, sys, trio
from pathlib import Path
from ha_runtime.replication.primary import fs as fusefs
backing, mnt = Path(sys.argv[1]), Path(sys.argv[2])
"""
    + LOCAL_ONLY_SINK
    + r"""
async def main():
    backing.mkdir(parents=True, exist_ok=True)
    mnt.mkdir(parents=True, exist_ok=True)
    serve = functools.partial(fusefs.serve, backing=backing, mountpoint=mnt,
                              sink=LocalOnly(), fsname="hapair-bench")
    async with trio.open_nursery() as n:
        await n.start(serve)
        print("mounted", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the benchmark closes stdin
        n.cancel_scope.cancel()

trio.run(main)
"""
)


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
    """Host PIDs of the node's replication children of MODULE in ROLE, as its daemon names
    them: a child started as a spare says `replicate spare` in its argv whatever its role."""
    rep = module_states(node).get(module, {}).get("replication") or {}
    if rep.get("role") != role:
        return []
    inner = {d["pid"] for d in rep.get("dirs", []) if isinstance(d.get("pid"), int)}
    return [host for host, ns_pid in _node_processes(node) if ns_pid in inner]


def node_pids(node: str, *words: str) -> list[int]:
    """Host PIDs of the node's processes whose argv holds all ``words`` (its PID namespace
    only: the host may run other copies, e.g. integration tests)."""
    found = []
    for host, _ in _node_processes(node):
        try:
            argv = Path(f"/proc/{host}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w.encode() in argv for w in words):
            found.append(host)
    return found


def _node_processes(node: str) -> list[tuple[int, int]]:
    """(host PID, PID inside the node) of every process in the node's PID namespace."""
    init = Lab().node(node).init_pid()
    if init is None:
        return []
    ns = os.readlink(f"/proc/{init}/ns/pid")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns/pid") != ns:
                continue
            status = (entry / "status").read_text()
        except OSError:
            continue
        nspid = next((ln.split() for ln in status.splitlines() if ln.startswith("NSpid:")), [])
        if len(nspid) >= 2:
            found.append((int(entry.name), int(nspid[-1])))
    return found


def _node_run(
    node: str, args: argparse.Namespace, d: str, workload: str, start_at: float = 0.0
) -> subprocess.Popen[str]:
    argv = ["python3", "-c", NODE_SCRIPT, d, workload, str(args.seconds), str(start_at)]
    return subprocess.Popen(Lab().exec_argv(node, argv), stdout=subprocess.PIPE, text=True)


@contextmanager
def fuse_only_mount(node: str, base: str) -> Iterator[tuple[str, list[int]]]:
    """Mount the FUSE-only file system on ``node`` under ``base``; yield the directory to
    write in and the PIDs of its process. Unmounted on the way out, whatever happened."""
    backing, mnt = f"{base}/backing", f"{base}/mnt"
    argv = [NODE_PYTHON, "-c", FUSE_SCRIPT, backing, mnt]
    proc = subprocess.Popen(
        Lab().exec_argv(node, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "mounted":
            raise RuntimeError(f"FUSE-only file system did not mount on {node} ({base})")
        yield mnt, node_pids(node, "-c", backing, mnt)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(Lab().exec_argv(node, ["umount", "-l", mnt]), check=False,
                       stderr=subprocess.DEVNULL)  # fmt: skip


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"node script failed ({proc.returncode})")
    return dict(json.loads(out))


def measure(args: argparse.Namespace, primary: str, secondary: str) -> list[dict[str, Any]]:
    """Rows: each workload on the local disk, through FUSE alone, then replicated, per run,
    with the CPU time the primary's and the secondary's replication processes (and the
    FUSE-only one) spent meanwhile; then the 4 KiB loop on both nodes' local disks at once."""
    with fuse_only_mount(primary, f"{args.local}-fuse") as (fuse_dir, fuse_pids):
        pids = {
            "primary": replica_pids(primary, "primary", args.module),
            "secondary": replica_pids(secondary, "secondary", args.module),
            FUSE_ONLY: fuse_pids,
        }
        return _measure_runs(args, primary, secondary, fuse_dir, pids)


def _measure_runs(
    args: argparse.Namespace,
    primary: str,
    secondary: str,
    fuse_dir: str,
    pids: dict[str, list[int]],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    places = (("local", args.local), (FUSE_ONLY, fuse_dir), ("replicated", f"{args.dir}/.bench"))
    for run in range(args.runs):
        for where, d in places:
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
        ("sqlite_delete_commits", "commits", "commits/s"),
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
        if not workload.startswith("sqlite"):
            ratio.target = f">= {TARGET_RATIO:.2f}"
            ratio.passed = ratio.median >= TARGET_RATIO
        figures += [local, repl, ratio]
        fuse = pick(workload, FUSE_ONLY, key)
        if fuse:
            figures += _fuse_only_figures(
                workload=workload, unit=unit, local=local, repl=repl, fuse=fuse, extra=extra
            )
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

    cpu_of = (
        ("primary", "replicated", "the primary's replication process(es)"),
        ("secondary", "replicated", "the secondary's replication process(es)"),
        (FUSE_ONLY, FUSE_ONLY, "the FUSE-only file system's process"),
    )
    for workload, unit in (("4k_fdatasync", "ms/op"), ("1m_sequential", "ms/MiB")):
        for proc, where, what in cpu_of:
            key = f"cpu_{proc}_s"
            samples = [
                float(r[key]) * 1000 / count(r)
                for r in rows
                if r["workload"] == workload and r["where"] == where and r.get(key) is not None
            ]
            if samples:
                figures.append(
                    Figure(
                        "replication",
                        f"{workload}_cpu_{proc}",
                        unit,
                        samples,
                        extra={"what": f"CPU time of {what}"},
                    )
                )
    for where in ("local", FUSE_ONLY, "replicated", BOTH_NODES):
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
                anchor="4k_fdatasync_p99_local" if where in ("replicated", FUSE_ONLY) else "",
            )
        )
    return figures


def _fuse_only_figures(
    *,
    workload: str,
    unit: str,
    local: Figure,
    repl: Figure,
    fuse: list[float],
    extra: dict[str, Any],
) -> list[Figure]:
    """The FUSE-only figure and its two ratios: the ceiling FUSE alone leaves any replication
    (against the local disk), and the share of it the replication keeps."""
    fuse_only = Figure(
        "replication",
        f"{workload}_fuse_only",
        unit,
        fuse,
        extra={
            **extra,
            "what": "the runtime's FUSE file system over a local directory, nothing replicated",
        },
        anchor=local.figure,
    )
    ceiling = Figure(
        "replication",
        f"{workload}_ratio_fuse_only",
        "fuse_only/local",
        [f / max(loc, 1e-9) for f, loc in zip(fuse, local.samples, strict=True)],
        extra={"what": "ceiling of any replication through the FUSE layer"},
    )
    kept = Figure(
        "replication",
        f"{workload}_ratio_to_fuse_only",
        "repl/fuse_only",
        [r / max(f, 1e-9) for r, f in zip(repl.samples, fuse, strict=True)],
        extra={"what": "what the replication keeps of the FUSE-only throughput"},
    )
    return [fuse_only, ceiling, kept]


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
            (primary, [f"{args.dir}/.bench", args.local, f"{args.local}-fuse"]),
            (secondary, [args.local]),
        ):
            subprocess.run(Lab().exec_argv(node, ["rm", "-rf", *gone]), check=False)
    extra = {"primary": primary, "secondary": secondary, "seconds": args.seconds}
    figures = figures_of(rows, extra)
    emit(figures)
    return 0 if all(f.passed is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
