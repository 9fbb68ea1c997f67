"""Every benchmark in one go on the lab, then benchmarks/report.md (`make bench`).

    python -m benchmarks.run_all [--quick] [--only NAME ...]

One run id (UTC time of the start) is stamped on every figure of the run; the figures go
to benchmarks/results/results.jsonl (append-only, every run) and to
benchmarks/results/<run id>.jsonl (this run only), and the report is built from this run's
figures alone: each ratio divides a figure by its anchor measured in the same run
(local-disk writes for replication, rsync for resync, node1's own address for the farm),
because the lab shares one noisy machine. Failover and switchover have absolute targets.

The lab is shared: the run holds /tmp/hapair-lab-session.lock while benchmarks run and
lets others have the lab between them: the lock is kept for the next benchmark only when
its expected duration still fits in `--lock-budget` minutes of holding (default 14), so
no hold is much longer than that. Each benchmark brings the lab up, deploys the demo site,
runs, then boots any node it left powered off. Under `flock <that file> make bench` the
lock held by the ancestor `flock` is recognised and not taken again.

A benchmark that crashes is reported as `error: ...` and the others still run; the
command then exits 1. Targets missed are `FAIL` in the report (exit status 0).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from benchmarks import (
    failover,
    farm,
    fuse_compiled,
    link_paths,
    peer_glusterfs,
    replication,
    resync,
    switchover,
)
from benchmarks.report import RESULTS_DIR, Figure, collecting
from ha_lab.lab import Lab
from ha_lab.observe import states_of, wait_for_states

ROOT = Path(__file__).resolve().parents[1]
REPORT = Path(__file__).resolve().parent / "report.md"
LAB_LOCK = Path("/tmp/hapair-lab-session.lock")
MIRROR_MODULE = "flightdata"
FARM_MODULE = "weather"

Main = Callable[[Sequence[str] | None], int]


@dataclass(frozen=True)
class Benchmark:
    name: str
    main: Main
    argv: tuple[str, ...]
    quick_argv: tuple[str, ...]
    what: str
    # Expected minutes with argv, with quick_argv (deploy included; measured 2026-12-03).
    minutes: tuple[float, float]


# In the order they run: the short ones first, resync (2 GiB written) last. The run counts
# keep the full run to about two holds of the shared lab's lock (about 14 min each).
BENCHMARKS = (
    Benchmark(
        "failover",
        failover.main,
        ("--runs", "6"),
        ("--runs", "2"),
        "primary crashed -> first request served through the VIP by the other node",
        (3, 2),
    ),
    Benchmark(
        "switchover",
        switchover.main,
        ("--runs", "6"),
        ("--runs", "2"),
        "`hactl swap`: longest gap a client probing every 20 ms sees",
        (1, 1),
    ),
    Benchmark(
        "farm",
        farm.main,
        # 10 s runs in 0.5 s ABBA slices: 120 direct/VIP pairs, an interval of about ±5 %
        ("--runs", "6", "--seconds", "10", "--takeover-runs", "3"),
        ("--runs", "2", "--seconds", "1", "--takeover-runs", "1"),
        "requests/s through the farm VIP vs node1's own address; bucket takeover after a crash",
        (4, 1.5),
    ),
    Benchmark(
        "replication",
        replication.main,
        ("--runs", "3", "--seconds", "3"),
        ("--runs", "1", "--seconds", "1"),
        "writes in the replicated directory vs the same writes on the node's local disk",
        (1.5, 1),
    ),
    Benchmark(
        "peer_glusterfs",
        peer_glusterfs.main,
        # 5 runs: its ratios divide two noisy figures (both replicate over the shared CPUs)
        ("--runs", "5", "--seconds", "3"),
        ("--runs", "1", "--seconds", "1"),
        "the same writes through hapair, GlusterFS replica 2 (set up on the two nodes for the "
        "run, then removed), FUSE alone and the local disk",
        (4.5, 3),
    ),
    Benchmark(
        "fuse_compiled",
        fuse_compiled.main,
        ("--rounds", "3", "--seconds", "2"),
        ("--rounds", "1", "--seconds", "1"),
        "the FUSE layer alone: the runtime's (pyfuse3) against libfuse's compiled passthrough "
        "and the local disk, on this host (the ceiling a compiled FUSE daemon would raise)",
        (1, 0.5),
    ),
    Benchmark(
        "link_paths",
        link_paths.main,
        ("--rounds", "6", "--ops", "3000"),
        ("--rounds", "2", "--ops", "500"),
        "the replication link's own CPU per 4 KiB write + barrier, on this host: its direct "
        "TLS path and deadline task against SSLStream and a trio timeout per barrier",
        (1, 0.5),
    ),
    Benchmark(
        "resync",
        resync.main,
        (),
        ("--only", "incremental"),
        "incremental (5 % of 1.09 GiB) and full delta (1 GiB file, 1 %) resync vs rsync",
        (12, 7),
    ),
)
NAMES = tuple(b.name for b in BENCHMARKS)


@dataclass
class Outcome:
    name: str
    what: str = ""
    argv: tuple[str, ...] = ()
    figures: list[Figure] = field(default_factory=list)
    error: str = ""
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Figure]:
        return [f for f in self.figures if f.passed is False]

    @property
    def verdict(self) -> str:
        if self.error:
            return "error"
        if self.failed:
            return "FAIL"
        return "pass" if any(f.passed for f in self.figures) else "-"


# -- the lab -----------------------------------------------------------------------------


def _lock_id(path: Path) -> str:
    st = path.stat()
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def held_by_ancestor(path: Path) -> bool:
    """True when a process we descend from (`flock FILE make bench`) holds the lock."""
    if not path.exists():
        return False
    wanted, mine = _lock_id(path), _ancestors()
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue  # "->" marks a waiter, not a holder
        if parts[5] == wanted and parts[4].isdigit() and int(parts[4]) in mine:
            return True
    return False


class LabLock:
    """The shared lab's session lock, held across benchmarks while within a time budget."""

    TURN_S = 10.0  # after a release, long enough for a waiting session to take the lock

    def __init__(self, path: Path | None, budget_s: float) -> None:
        self.path = None if path is None or held_by_ancestor(path) else path
        self.budget_s = budget_s
        self.handle: IO[str] | None = None
        self.since = 0.0
        self.waited_s = 0.0

    def hold_for(self, expected_s: float) -> bool:
        """Hold the lock for the next expected_s seconds, releasing it first if that
        would make this hold longer than the budget (others get their turn). True when
        the lab may have been used by others since our last benchmark."""
        if self.path is None:
            return False
        if self.handle and time.monotonic() - self.since + expected_s > self.budget_s:
            self.release()
            # flock is not fair: re-locking at once would win against those blocked on it.
            time.sleep(self.TURN_S)
        if self.handle:
            return False
        handle = self.path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"run_all: waiting for the lab lock {self.path} ...", file=sys.stderr, flush=True)
            waited = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            self.waited_s += time.monotonic() - waited
            print(f"run_all: lab lock taken after {time.monotonic() - waited:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
        self.handle, self.since = handle, time.monotonic()
        return True

    def release(self) -> None:
        if self.handle:
            held = time.monotonic() - self.since
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
            print(f"run_all: lab lock released after {held:.0f} s", file=sys.stderr, flush=True)


def deploy() -> None:
    """The lab up with two nodes and the demo site deployed, both modules steady."""
    Lab().up(2)
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"}
    playbook = Path(sys.executable).parent / "ansible-playbook"
    proc = subprocess.run(
        [str(playbook), "playbooks/deploy.yml", "-i", "inventories/lab"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"deploy.yml failed (rc {proc.returncode}): {proc.stdout[-1500:]}")
    steady(timeout=180)


def steady(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    mirror: dict[str, str] = {}
    while time.monotonic() < deadline:
        mirror = states_of(MIRROR_MODULE)
        if sorted(mirror.values()) == ["PRIM", "SECOND"]:
            break
        time.sleep(0.5)
    else:
        raise RuntimeError(f"{MIRROR_MODULE} not PRIM/SECOND after {timeout:.0f} s: {mirror}")
    left = max(10.0, deadline - time.monotonic())
    farm_states = wait_for_states(FARM_MODULE, {"node1": "UP", "node2": "UP"}, left)
    if set(farm_states.values()) != {"UP"} or len(farm_states) < 2:
        raise RuntimeError(f"{FARM_MODULE} not UP on both nodes: {farm_states}")


def heal() -> list[str]:
    """Boot any node a benchmark left powered off, lift any fault; what was done."""
    lab, done = Lab(), []
    for node in lab.describe()["nodes"]:
        if not node["running"]:
            lab.boot(node["name"])
            done.append(f"booted {node['name']}")
        elif node["faults"]:
            lab.restore(node["name"])
            done.append(f"lifted faults of {node['name']}: {node['faults']}")
    return done


# -- running -----------------------------------------------------------------------------


def run_one(
    bench: Benchmark, quick: bool, run_id: str, lock: LabLock, fresh: bool = True
) -> Outcome:
    """One benchmark; deploys first when the lab may have changed since the last one."""
    argv = bench.quick_argv if quick else bench.argv
    out = Outcome(bench.name, bench.what, argv)
    print(f"\n=== {bench.name} {' '.join(argv)}", file=sys.stderr, flush=True)
    fresh = lock.hold_for(60 * bench.minutes[1 if quick else 0]) or fresh
    started = time.monotonic()
    try:
        with collecting(run_id) as figures:
            try:
                if fresh:
                    deploy()
                else:
                    steady(timeout=120)
                rc = bench.main(list(argv))
            except SystemExit as exc:  # argparse, or a benchmark giving up with a message
                code = exc.code
                rc = code if isinstance(code, int) else 1
                if code is not None and not isinstance(code, int):
                    out.error = str(code)
            except Exception as exc:
                traceback.print_exc()
                out.error = f"{type(exc).__name__}: {exc}"
                rc = 1
        out.figures = list(figures)
        if not out.error and rc != 0 and not out.failed:
            out.error = f"exit status {rc} and no figure below its target (see the log)"
    finally:
        try:
            out.notes += heal()
            steady(timeout=300)
        except Exception as exc:
            out.notes.append(f"lab not steady after the run: {type(exc).__name__}: {exc}")
        out.wall_s = time.monotonic() - started
    print(f"=== {bench.name}: {out.verdict} in {out.wall_s:.0f} s {out.error}", file=sys.stderr)
    return out


# -- the report --------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line),
        platform.processor() or "unknown",
    )
    meminfo = Path("/proc/meminfo").read_text().split()
    ram_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / (1 << 20)
    os_name = "Linux"
    release = Path("/etc/os-release")
    if release.exists():
        for line in release.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return {
        "cpu": f"{model}, {os.cpu_count()} logical CPUs",
        "ram": f"{ram_gib:.1f} GiB",
        "kernel": platform.release(),
        "os": os_name,
        "load": Path("/proc/loadavg").read_text().split()[0],
    }


def git_commit() -> str:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return proc.stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit} (plus uncommitted changes in the tree)" if dirty else commit


def number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"  # 2.00, not 2


def cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def table(outcome: Outcome) -> list[str]:
    rows = [
        "| figure | median | p95 | runs | anchor (median) | ratio to anchor | target | pass/fail |",
        "|---|---:|---:|---:|---|---:|---|---|",
    ]
    by_name = {f.figure: f for f in outcome.figures}
    for fig in outcome.figures:
        anchor, ratio = "-", "-"
        if fig.anchor:
            ref = by_name.get(fig.anchor)
            if ref is None:
                anchor, ratio = f"{fig.anchor} (not measured in this run)", "n/a"
            else:
                anchor = f"{ref.figure} ({number(ref.median)} {ref.unit})"
                ratio = f"{fig.median / ref.median:.2f}" if ref.median else "n/a"
        verdict = "-" if fig.passed is None else ("pass" if fig.passed else "**FAIL**")
        rows.append(
            f"| {fig.figure} ({fig.unit}) | {number(fig.median)} | {number(fig.p95)} | "
            f"{len(fig.samples)} | {anchor} | {ratio} | {cell(fig.target) or '-'} | {verdict} |"
        )
    if outcome.error:
        rows.append(f"| **error: {cell(outcome.error)[:400]}** | | | | | | | **error** |")
    return rows


def render(header: dict[str, str], outcomes: Sequence[Outcome]) -> str:
    lines = [
        "# Benchmark report",
        "",
        f"Generated by `{header['command']}` (run `{header['run_id']}`, "
        f"{header['mode']}); raw figures: [`{header['raw']}`]({header['raw']}).",
        "",
        f"- date: {header['date']}",
        f"- git commit: {header['commit']}",
        f"- machine: {header['cpu']}; {header['ram']} RAM; kernel {header['kernel']} "
        f"({header['os']}); load average {header['load']} at the start",
        f"- lab: {header['lab']}",
        f"- wall time: {header['wall']}",
        "",
        "Ratios divide a figure's median by its anchor's median, both measured in this run "
        "(the lab nodes share the machine's CPUs, so absolute figures move with its load). "
        "p95 is nearest-rank; with a single run it is that run.",
        "",
        "| benchmark | result | figures | wall time |",
        "|---|---|---:|---:|",
    ]
    for o in outcomes:
        result = o.verdict if not o.error else f"error: {cell(o.error)[:120]}"
        lines.append(f"| [{o.name}](#{o.name}) | {result} | {len(o.figures)} | {o.wall_s:.0f} s |")
    for o in outcomes:
        lines += [
            "",
            f"## {o.name}",
            "",
            f"{o.what}. Options: `{' '.join(o.argv) or '(defaults)'}`.",
        ]
        lines += ["", *table(o)]
        for note in o.notes:
            lines.append(f"\nNote: {note}.")
    return "\n".join(lines) + "\n"


def lab_summary() -> str:
    try:
        nodes = Lab().describe()["nodes"]
    except Exception as exc:
        return f"unknown ({exc})"
    return (
        f"{len(nodes)} systemd-nspawn nodes (Debian 12) on this same machine, each with its "
        "own 8 GiB loop-device disk, bridged mgmt/lan/hb networks; demo site from "
        "`playbooks/deploy.yml -i inventories/lab` (mirror `flightdata`, farm `weather`, "
        "heartbeat 100 ms / 1 s); client probes from the lab's client namespace"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    parser.add_argument("--only", action="append", choices=NAMES, help="repeatable")
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument("--lock", type=Path, default=LAB_LOCK, help="the lab's session lock")
    parser.add_argument("--no-lock", action="store_true", help="the caller holds the lab lock")
    parser.add_argument(
        "--lock-budget", type=float, default=14.0, help="minutes of one hold of the lab lock"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run_all: the benchmarks need root (the lab)", file=sys.stderr)
        return 2
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    started_at, started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.monotonic()
    header: dict[str, Any] = {
        "command": "python -m benchmarks.run_all" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "run_id": run_id,
        "mode": "quick: fewer runs, not for comparison" if args.quick else "full run counts",
        "raw": f"results/{run_id}.jsonl",
        "date": started_at,
        "commit": git_commit(),
        **machine(),
    }
    lock = LabLock(None if args.no_lock else args.lock, 60 * args.lock_budget)
    outcomes: list[Outcome] = []
    try:
        for bench in BENCHMARKS:
            if not args.only or bench.name in args.only:
                fresh = not outcomes or bool(outcomes[-1].error or outcomes[-1].notes)
                outcomes.append(run_one(bench, args.quick, run_id, lock, fresh))
    finally:
        lock.release()
    header["lab"] = lab_summary()
    header["wall"] = (
        f"{(time.monotonic() - started) / 60:.1f} min, of which {lock.waited_s / 60:.1f} min "
        "waiting for the shared lab's lock"
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{run_id}.jsonl").touch()
    args.report.write_text(render(header, outcomes))
    print(f"\nreport: {args.report}  raw: {RESULTS_DIR / (run_id + '.jsonl')}")
    for o in outcomes:
        print(f"  {o.name:<12} {o.verdict:<6} {o.wall_s:6.0f} s  {o.error}")
    summary = {o.name: o.verdict for o in outcomes}
    print(json.dumps({"run_id": run_id, "results": summary}))
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
