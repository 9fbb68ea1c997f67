"""hapair's replication side by side with a real peer: GlusterFS replica 2 on the same lab.

Run on the lab with the demo site deployed, as root (and under the lab's session lock):
    python -m benchmarks.peer_glusterfs [--runs 3] [--seconds 3]

Sets up Debian 12's GlusterFS 10.3 on the module's two nodes, measures, and removes it
again, all in one invocation:

1. the packages come from the host's cache (ha_lab.packages: downloaded once with apt,
   installed in the nodes with dpkg, no network inside the lab) onto both nodes;
2. glusterd started on both; the primary probes the secondary on the heartbeat network,
   the first of the networks hapair's replication link tries (`replication.networks`
   defaults to `[hb, lan]`), so both systems replicate over the same link;
3. `gluster --mode=script volume create hapairbench replica 2 <primary>:BRICK
   <secondary>:BRICK force`: each brick a directory on the node's own disk (its root file
   system, the disk that also holds hapair's backing directory and the local-disk
   workload's /var/tmp), not inside hapair's replicated directory; `force` because a
   brick on the root file system is refused otherwise;
4. volume options (VOLUME_OPTIONS) so that an fsync means on GlusterFS what it means on
   hapair: the data is on both nodes' disks when it returns;
5. the volume mounted with the FUSE client (`mount -t glusterfs`) on the primary;
6. a second volume the same way, with TLS on its I/O path (TLS_OPTIONS: `client.ssl` and
   `server.ssl` on, certificates of a CA made for this run), mounted beside the first.
   hapair's replication link is always TLS 1.3; GlusterFS encrypts only when told to. The
   plain volume is the issue's peer (its targets); the TLS one is the same guarantee on
   the wire, an operator's choice between machine rooms, and is reported beside it.

Then, in one run, the replication benchmark's three workloads (4 KiB write + fdatasync,
1 MiB sequential, SQLite commits) on the primary, `--runs` times each, in: its local disk,
the runtime's FUSE file system with nothing replicated (`fuse_only`), hapair's replicated
directory and the two GlusterFS mounts; the order of the five rotates from run to run so
none always runs first. `*_hapair_vs_glusterfs` is hapair's figure over GlusterFS's, run by
run (targets of issue 16); `*_hapair_vs_glusterfs_tls` the same over GlusterFS with TLS. CPU
time of each system's processes per operation is reported too.

Teardown, whatever happened: unmount, volumes stopped and deleted, peer detach, glusterd and
every remaining gluster process stopped, the packages purged and gluster's state and the
bricks removed, so the lab is left as found. A failing step is named in the error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.mirror_lab import steady_pair
from benchmarks.replication import (
    FUSE_ONLY,
    NODE_SCRIPT,
    WORKLOADS,
    _cpu_seconds,
    fuse_only_mount,
    node_pids,
    replica_pids,
)
from benchmarks.report import Figure, emit, percentile
from ha_lab import packages
from ha_lab.lab import Lab
from ha_lab.system import LabError, run
from ha_lab.topology import HB, node_host, node_index

BENCHMARK = "peer_glusterfs"
VOLUME = "hapairbench"
# On the node's root file system (its own disk), beside /var/lib/hapair, not under it.
GLUSTER_DIR = "/var/lib/hapair-bench-glusterfs"
BRICK = f"{GLUSTER_DIR}/brick"
MOUNT = "/mnt/hapair-bench-glusterfs"
# The TLS volume: its own bricks and mount, its certificates under GLUSTER_DIR (removed with it).
VOLUME_TLS = "hapairbench-tls"
BRICK_TLS = f"{GLUSTER_DIR}/tls-brick"
MOUNT_TLS = "/mnt/hapair-bench-glusterfs-tls"
TLS_DIR = f"{GLUSTER_DIR}/tls"
TLS_FILES = ("glusterfs.pem", "glusterfs.key", "glusterfs.ca")
GLUSTER = ("gluster", "--mode=script")
# Its presence on a node means GlusterFS is (still) installed there.
GLUSTER_MARK = "glusterfs-common"
# Gluster's state and logs, created by the packages and glusterd; removed after the purge.
GLUSTER_STATE = ("/var/lib/glusterd", "/var/log/glusterfs", "/etc/glusterfs")

# What makes an fsync mean the same on both systems. hapair: fsync returns when the data
# is on the primary's disk and acknowledged durable by the secondary (docs/replication.md).
# - write-behind off: each write goes to both bricks before it returns, nothing is held in
#   the client (with it on, a write error can surface only at a later call);
# - flush-behind off: close() waits for the flush instead of returning at once (it only
#   acts with write-behind, off here for clarity too);
# - cluster.ensure-durability on (already Gluster's default, set so the report shows it):
#   AFR sends the fsync to both bricks and fsyncs its changelog, so an fsync is on disk on
#   both nodes, as hapair's barrier is.
# Left at their defaults, and why:
# - performance.strict-o-direct (off): it only changes files opened with O_DIRECT, and no
#   workload here does (nor can hapair's FUSE mount: it has no direct I/O);
# - cluster.eager-lock (on): AFR keeps the inode lock across one client's consecutive
#   writes instead of a lock/unlock round per write. A cost, not a durability knob:
#   turning it off would only slow GlusterFS down for a single writer.
VOLUME_OPTIONS = (
    ("performance.write-behind", "off"),
    ("performance.flush-behind", "off"),
    ("cluster.ensure-durability", "on"),
)
# The TLS volume's, on top of VOLUME_OPTIONS: TLS between the client and both bricks (I/O
# path; glusterd's management traffic is not what the benchmark measures), each side
# verifying the other's certificate against the run's CA. `auth.ssl-allow *`: any name the
# CA signed, i.e. this run's two nodes. The files are named explicitly: Debian's default is
# /usr/lib/ssl/glusterfs.*, outside what the teardown removes.
TLS_OPTIONS = (
    ("client.ssl", "on"),
    ("server.ssl", "on"),
    ("auth.ssl-allow", "*"),
    ("ssl.own-cert", f"{TLS_DIR}/glusterfs.pem"),
    ("ssl.private-key", f"{TLS_DIR}/glusterfs.key"),
    ("ssl.ca-list", f"{TLS_DIR}/glusterfs.ca"),
)
# Recorded with the figures: the volume's actual values (`gluster volume get`).
REPORTED_OPTIONS = (
    *(name for name, _ in VOLUME_OPTIONS),
    "performance.strict-o-direct",
    "cluster.eager-lock",
)

GLUSTERFS = "glusterfs"
GLUSTERFS_TLS = "glusterfs_tls"
PLACES = ("local", FUSE_ONLY, "replicated", GLUSTERFS, GLUSTERFS_TLS)
# Issue 16: hapair at least this many times GlusterFS, each workload.
TARGET_VS_GLUSTERFS = {"4k_fdatasync": 3.0, "1m_sequential": 2.0, "sqlite_commits": 3.0}
KEYS = (
    ("4k_fdatasync", "ops", "ops/s"),
    ("1m_sequential", "mbps", "MB/s"),
    ("sqlite_commits", "commits", "commits/s"),
    ("sqlite_delete_commits", "commits", "commits/s"),
)
# Processes whose CPU time is charged to a place: each system's own.
CPU_OF = {
    "replicated": ("hapair_primary", "hapair_secondary"),
    GLUSTERFS: ("glusterfs_client", "glusterfs_brick_primary", "glusterfs_brick_secondary"),
    GLUSTERFS_TLS: (
        "glusterfs_tls_client",
        "glusterfs_tls_brick_primary",
        "glusterfs_tls_brick_secondary",
    ),
    FUSE_ONLY: ("fuse_only",),
}


class StepFailed(RuntimeError):
    """A setup or teardown step failed; the message names the step and the node."""


def hb_address(node: str) -> str:
    return HB.address(node_host(node_index(node)))


def volume_create_argv(
    primary: str, secondary: str, volume: str = VOLUME, brick: str = BRICK
) -> list[str]:
    bricks = [f"{hb_address(n)}:{brick}" for n in (primary, secondary)]
    return [*GLUSTER, "volume", "create", volume, "replica", "2", *bricks, "force"]


def node_certificates(nodes: Sequence[str]) -> dict[str, dict[str, str]]:
    """TLS_FILES of each node (its key, its certificate, the CA's), from a CA made here for
    this run only (openssl, as the runtime role makes the site's secrets)."""

    def openssl(*args: str) -> None:
        try:
            run(["openssl", *args], timeout=60)
        except LabError as exc:
            raise StepFailed(f"TLS certificates: {exc}") from exc

    out: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="hapair-bench-gluster-tls-") as tmp:
        d = Path(tmp)
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=hapair-bench-glusterfs-ca",
                "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
        for node in nodes:
            openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={node}",
                    "-keyout", str(d / f"{node}.key"), "-out", str(d / f"{node}.csr"))  # fmt: skip
            openssl("x509", "-req", "-days", "2", "-in", str(d / f"{node}.csr"),
                    "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                    "-CAcreateserial", "-out", str(d / f"{node}.pem"))  # fmt: skip
            out[node] = {
                "glusterfs.pem": (d / f"{node}.pem").read_text(),
                "glusterfs.key": (d / f"{node}.key").read_text(),
                "glusterfs.ca": (d / "ca.pem").read_text(),
            }
    return out


def peer_connected(peer_status: str, address: str) -> bool:
    """True when `gluster peer status` lists ``address`` in the cluster and connected."""
    for block in peer_status.split("\n\n"):
        lines = [line.strip() for line in block.splitlines()]
        names = {line.split(":", 1)[1].strip() for line in lines if line.startswith("Hostname:")}
        names |= {line for line in lines if line and ":" not in line}  # "Other names:" list
        if address in names and "State: Peer in Cluster (Connected)" in lines:
            return True
    return False


def parse_volume_get(output: str) -> dict[str, str]:
    """`gluster volume get VOL OPTION` prints a header then "option   value" lines."""
    values = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] != "Option" and not parts[0].startswith("-"):
            values[parts[0]] = parts[1]
    return values


def rotated(places: Sequence[str], run: int) -> list[str]:
    """The places in the order run ``run`` visits them: each first once in turn."""
    k = run % len(places)
    return [*places[k:], *places[:k]]


@dataclass
class GlusterPair:
    """GlusterFS replica 2 on the lab's primary and secondary, set up and torn down."""

    primary: str
    secondary: str
    # Packages of the set on each node before setup: teardown purges only the others.
    before: dict[str, set[str]] = field(default_factory=dict)

    @property
    def nodes(self) -> tuple[str, str]:
        return self.primary, self.secondary

    def _run(
        self,
        step: str,
        node: str,
        argv: list[str],
        timeout: float = 120,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        try:
            return run(Lab().exec_argv(node, argv), timeout=timeout, input_text=input_text)
        except LabError as exc:
            raise StepFailed(f"{step} on {node}: {exc}") from exc

    def _probe(self, node: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return run(Lab().exec_argv(node, argv), check=False, timeout=60)

    def _answers(self, node: str) -> bool:
        return self._probe(node, [*GLUSTER, "pool", "list"]).returncode == 0

    def _wait(self, step: str, what: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise StepFailed(f"{step}: not done after {timeout:.0f} s")
            time.sleep(0.5)

    def _present(self, node: str) -> set[str]:
        _, debs = packages.ensure_debs(packages.GLUSTERFS)
        return packages.present(packages.status(Lab().node(node), [d.package for d in debs]))

    def setup(self) -> dict[str, str]:
        """Install, start, probe, create, set, start and mount; the volume's options."""
        for node in self.nodes:
            self.before[node] = self._present(node)
        if any(GLUSTER_MARK in have for have in self.before.values()):
            # An earlier run could not tear down: its packages were not on the node before.
            print(
                f"peer_glusterfs: removing an earlier run's GlusterFS first: {self.before}",
                file=sys.stderr,
            )
            self.before = {node: set() for node in self.nodes}
            problems = self.teardown()
            if problems:
                raise StepFailed("; ".join(problems))
            self.before = {node: self._present(node) for node in self.nodes}
        for node in self.nodes:
            try:
                packages.install(Lab().node(node), packages.GLUSTERFS)
            except LabError as exc:
                raise StepFailed(f"install packages on {node}: {exc}") from exc
        for node in self.nodes:
            self._run("start glusterd", node, ["systemctl", "start", "glusterd"])
        for node in self.nodes:
            self._wait(f"glusterd answering on {node}", partial(self._answers, node))
        peer, me = hb_address(self.secondary), hb_address(self.primary)
        self._run("peer probe", self.primary, [*GLUSTER, "peer", "probe", peer])
        self._wait(
            f"peer {peer} connected",
            lambda: peer_connected(
                self._probe(self.primary, [*GLUSTER, "peer", "status"]).stdout, peer
            ),
        )
        # Probing back names the primary by its hb address on the secondary too (it would
        # otherwise know it only by the address the probe came from).
        self._run("peer probe back", self.secondary, [*GLUSTER, "peer", "probe", me])
        self._volume(VOLUME, BRICK, MOUNT, VOLUME_OPTIONS)
        for node, files in node_certificates(self.nodes).items():
            for name, text in files.items():
                self._run(
                    f"TLS file {name}",
                    node,
                    ["sh", "-c", f'umask 077 && mkdir -p {TLS_DIR} && cat > "{TLS_DIR}/{name}"'],
                    input_text=text,
                )
        self._volume(VOLUME_TLS, BRICK_TLS, MOUNT_TLS, (*VOLUME_OPTIONS, *TLS_OPTIONS))
        options = {}
        for name in REPORTED_OPTIONS:
            out = self._run(
                f"volume get {name}", self.primary, [*GLUSTER, "volume", "get", VOLUME, name]
            ).stdout
            options.update(parse_volume_get(out))
        return options

    def _volume(
        self, volume: str, brick: str, mount: str, options: Sequence[tuple[str, str]]
    ) -> None:
        """Create, set, start and mount one replica 2 volume (steps named by volume)."""
        for node in self.nodes:
            self._run(f"{volume}: brick directory", node, ["mkdir", "-p", brick])
        self._run(
            f"{volume}: volume create",
            self.primary,
            volume_create_argv(self.primary, self.secondary, volume, brick),
        )
        for name, value in options:
            self._run(
                f"{volume}: volume set {name}",
                self.primary,
                [*GLUSTER, "volume", "set", volume, name, value],
            )
        self._run(f"{volume}: volume start", self.primary, [*GLUSTER, "volume", "start", volume])
        self._run(f"{volume}: mount directory", self.primary, ["mkdir", "-p", mount])
        me = hb_address(self.primary)
        self._run(
            f"{volume}: mount",
            self.primary,
            ["mount", "-t", "glusterfs", f"{me}:/{volume}", mount],
            timeout=60,
        )
        self._run(f"{volume}: mount check", self.primary, ["mountpoint", "-q", mount])

    def pids(self) -> dict[str, list[int]]:
        """Host PIDs of each volume's FUSE client on the primary and of its brick on each
        node (a brick's argv names its directory)."""
        pids: dict[str, list[int]] = {}
        for place, brick, mount in (
            (GLUSTERFS, BRICK, MOUNT),
            (GLUSTERFS_TLS, BRICK_TLS, MOUNT_TLS),
        ):
            pids |= {
                f"{place}_client": node_pids(self.primary, "/usr/sbin/glusterfs", mount),
                f"{place}_brick_primary": node_pids(self.primary, "/usr/sbin/glusterfsd", brick),
                f"{place}_brick_secondary": node_pids(
                    self.secondary, "/usr/sbin/glusterfsd", brick
                ),
            }
        return pids

    def teardown(self) -> list[str]:
        """Every step tried even when one fails; the failures, each naming its step."""
        problems: list[str] = []

        def step(name: str, node: str, argv: list[str], timeout: float = 120) -> bool:
            try:
                self._run(name, node, argv, timeout)
            except StepFailed as exc:
                problems.append(f"teardown: {exc}")
                return False
            return True

        def has_gluster(node: str) -> bool:
            return self._probe(node, ["sh", "-c", "command -v gluster"]).returncode == 0

        for mount in (MOUNT, MOUNT_TLS):
            mounted = self._probe(self.primary, ["mountpoint", "-q", mount]).returncode == 0
            if mounted and not step(f"unmount {mount}", self.primary, ["umount", mount]):
                step(f"unmount {mount} (lazy)", self.primary, ["umount", "-l", mount])
        for volume in (VOLUME, VOLUME_TLS) if has_gluster(self.primary) else ():
            info = self._probe(self.primary, [*GLUSTER, "volume", "info", volume])
            if info.returncode == 0:
                if "Status: Started" in info.stdout:
                    step(
                        f"{volume}: volume stop",
                        self.primary,
                        [*GLUSTER, "volume", "stop", volume, "force"],
                    )
                step(
                    f"{volume}: volume delete", self.primary, [*GLUSTER, "volume", "delete", volume]
                )
        if has_gluster(self.primary):
            status = self._probe(self.primary, [*GLUSTER, "peer", "status"]).stdout
            peer = hb_address(self.secondary)
            if peer in status:
                step("peer detach", self.primary, [*GLUSTER, "peer", "detach", peer])
        for node in self.nodes:
            if has_gluster(node):
                step("stop glusterd", node, ["systemctl", "stop", "glusterd"])
            # Stopping glusterd ends the bricks in its cgroup; the FUSE client (started by
            # mount) and anything a failed stop left are ended by PID, in this node only.
            _end(
                pid
                for w in ("/usr/sbin/glusterfsd", "/usr/sbin/glusterfs")
                for pid in node_pids(node, w)
            )
            had = self.before.get(node)
            if had is None:
                continue  # never looked at what the node had: nothing of ours to purge
            try:
                packages.purge(Lab().node(node), sorted(self._present(node) - had))
            except LabError as exc:
                problems.append(f"teardown: purge packages on {node}: {exc}")
                continue
            step(
                "remove gluster state",
                node,
                ["rm", "-rf", GLUSTER_DIR, MOUNT, MOUNT_TLS, *GLUSTER_STATE],
            )
            # As found: none of the set's packages but those it had, no gluster process.
            left = sorted(self._present(node) - had)
            procs = [
                p
                for w in ("/usr/sbin/glusterd", "/usr/sbin/glusterfsd", "/usr/sbin/glusterfs")
                for p in node_pids(node, w)
            ]
            if left or procs:
                problems.append(f"teardown: check on {node}: packages {left}, processes {procs}")
        return problems


def _end(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGTERM these processes, then SIGKILL those still there after ``timeout``."""
    pending = list(pids)
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        pending = [pid for pid in pending if os.path.exists(f"/proc/{pid}")]
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _node_run(node: str, args: argparse.Namespace, d: str, workload: str) -> subprocess.Popen[str]:
    argv = ["python3", "-c", NODE_SCRIPT, d, workload, str(args.seconds), "0"]
    return subprocess.Popen(Lab().exec_argv(node, argv), stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"node script failed ({proc.returncode})")
    return dict(json.loads(out))


def measure_runs(
    args: argparse.Namespace,
    primary: str,
    dirs: dict[str, str],
    pids: dict[str, list[int]],
) -> list[dict[str, Any]]:
    """Rows: each workload in each place, per run, with the CPU time each process whose
    place it is spent meanwhile (keys cpu_<process>_s)."""
    rows: list[dict[str, Any]] = []
    for run_no in range(args.runs):
        # Workload by workload, the four places back to back: the figures a ratio divides
        # are seconds apart, not a whole round of workloads (the machine is shared).
        for workload in WORKLOADS:
            for where in rotated(PLACES, run_no):
                procs = {p: pids.get(p, []) for p in CPU_OF.get(where, ())}
                before = {p: _cpu_seconds(v) for p, v in procs.items()}
                row = _result(_node_run(primary, args, dirs[where], workload))
                for p, v in procs.items():
                    after, b = _cpu_seconds(v), before[p]
                    row[f"cpu_{p}_s"] = None if after is None or b is None else after - b
                rows.append({"run": run_no, "where": where, "workload": workload, **row})
    return rows


def _pick(rows: list[dict[str, Any]], workload: str, where: str, key: str) -> list[float]:
    """One value per run, in run order (rows of a run come in rotated place order)."""
    found = [r for r in rows if r["workload"] == workload and r["where"] == where]
    return [float(r[key]) for r in sorted(found, key=lambda r: int(r["run"]))]


def _ratio(num: list[float], den: list[float]) -> list[float]:
    return [n / max(d, 1e-9) for n, d in zip(num, den, strict=True)]


def figures_of(rows: list[dict[str, Any]], extra: dict[str, Any]) -> list[Figure]:
    figures: list[Figure] = []
    for workload, key, unit in KEYS:
        local = _pick(rows, workload, "local", key)
        repl = _pick(rows, workload, "replicated", key)
        gluster = _pick(rows, workload, GLUSTERFS, key)
        if not local:
            continue  # a workload this run did not measure (results of an older version)
        anchor = f"{workload}_local"
        figures.append(Figure(BENCHMARK, anchor, unit, local, extra=extra))
        fuse = _pick(rows, workload, FUSE_ONLY, key)
        if fuse:
            figures.append(
                Figure(
                    BENCHMARK,
                    f"{workload}_fuse_only",
                    unit,
                    fuse,
                    anchor=anchor,
                    extra={"what": "the runtime's FUSE file system, nothing replicated"},
                )
            )
        figures += [
            Figure(
                BENCHMARK,
                f"{workload}_replicated",
                unit,
                repl,
                anchor=anchor,
                extra={"what": "hapair's replicated directory"},
            ),
            Figure(
                BENCHMARK,
                f"{workload}_glusterfs",
                unit,
                gluster,
                anchor=anchor,
                extra={"what": "GlusterFS replica 2, FUSE client"},
            ),
            Figure(BENCHMARK, f"{workload}_ratio_replicated", "repl/local", _ratio(repl, local)),
            Figure(
                BENCHMARK, f"{workload}_ratio_glusterfs", "glusterfs/local", _ratio(gluster, local)
            ),
        ]
        target = TARGET_VS_GLUSTERFS.get(workload)
        versus = Figure(
            BENCHMARK,
            f"{workload}_hapair_vs_glusterfs",
            "repl/glusterfs",
            _ratio(repl, gluster),
            target=f">= {target:g}" if target else "",
            extra={"what": "hapair over GlusterFS, each run's pair measured side by side"},
        )
        if target:
            versus.passed = versus.median >= target
        figures.append(versus)
        tls = _pick(rows, workload, GLUSTERFS_TLS, key)
        if tls:  # absent from the results of runs before it was measured
            figures += [
                Figure(
                    BENCHMARK,
                    f"{workload}_glusterfs_tls",
                    unit,
                    tls,
                    anchor=anchor,
                    extra={"what": "GlusterFS replica 2 with TLS on its I/O path, FUSE client"},
                ),
                Figure(
                    BENCHMARK,
                    f"{workload}_hapair_vs_glusterfs_tls",
                    "repl/glusterfs_tls",
                    _ratio(repl, tls),
                    extra={"what": "hapair over GlusterFS, both encrypting on the wire"},
                ),
            ]
    figures += _cpu_figures(rows)
    for where in PLACES:
        lat = [
            x * 1000
            for r in rows
            if r["workload"] == "4k_fdatasync" and r["where"] == where
            for x in r["lat"]
        ]
        if lat:
            figures.append(
                Figure(
                    BENCHMARK,
                    f"4k_fdatasync_p99_{where}",
                    "ms",
                    [percentile(lat, 99)],
                    extra={"p50_ms": percentile(lat, 50), "ops": len(lat)},
                    anchor="" if where == "local" else "4k_fdatasync_p99_local",
                )
            )
    return figures


def _cpu_figures(rows: list[dict[str, Any]]) -> list[Figure]:
    """Each system's CPU time per 4 KiB operation and per MiB, process by process and in
    total (hapair: both replication processes; GlusterFS: client and both bricks)."""

    def count(r: dict[str, Any]) -> float:  # 4 KiB operations, or MiB written
        return float(len(r["lat"]) if "lat" in r else r["mib"])

    figures = []
    for workload, unit in (("4k_fdatasync", "ms/op"), ("1m_sequential", "ms/MiB")):
        for where, procs in CPU_OF.items():
            mine = [r for r in rows if r["workload"] == workload and r["where"] == where]
            totals: list[float] = []
            for proc in procs:
                samples = [
                    float(r[f"cpu_{proc}_s"]) * 1000 / count(r)
                    for r in mine
                    if r.get(f"cpu_{proc}_s") is not None
                ]
                if samples:
                    figures.append(Figure(BENCHMARK, f"{workload}_cpu_{proc}", unit, samples))
            if len(procs) > 1 and all(r.get(f"cpu_{p}_s") is not None for r in mine for p in procs):
                totals = [
                    sum(float(r[f"cpu_{p}_s"]) for p in procs) * 1000 / count(r) for r in mine
                ]
            if totals:
                figures.append(
                    Figure(
                        BENCHMARK,
                        f"{workload}_cpu_{where}_total",
                        unit,
                        totals,
                        extra={"processes": list(procs)},
                    )
                )
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--module", default="flightdata")
    parser.add_argument("--dir", default="/var/lib/flightdata", help="a replicated directory")
    parser.add_argument("--local", default="/var/tmp/hapair-bench-peer")
    args = parser.parse_args(argv)
    # On the host, before the lab is touched: the only step that may need the network.
    _, debs = packages.ensure_debs(packages.GLUSTERFS)
    version = next(d.version for d in debs if d.package == "glusterfs-server")
    primary, secondary = steady_pair(args.module)
    pair = GlusterPair(primary, secondary)
    rows: list[dict[str, Any]] = []
    options: dict[str, str] = {}
    failed = ""
    started = time.monotonic()
    try:
        options = pair.setup()
        setup_s = time.monotonic() - started
        print(f"peer_glusterfs: GlusterFS up in {setup_s:.0f} s: {options}", file=sys.stderr)
        with fuse_only_mount(primary, f"{args.local}-fuse") as (fuse_dir, fuse_pids):
            pids = {
                "hapair_primary": replica_pids(primary, "primary", args.module),
                "hapair_secondary": replica_pids(secondary, "secondary", args.module),
                "fuse_only": fuse_pids,
                **pair.pids(),
            }
            dirs = {
                "local": args.local,
                FUSE_ONLY: fuse_dir,
                "replicated": f"{args.dir}/.bench-peer",
                GLUSTERFS: f"{MOUNT}/bench",
                GLUSTERFS_TLS: f"{MOUNT_TLS}/bench",
            }
            rows = measure_runs(args, primary, dirs, pids)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        failed = str(e)
    finally:
        cleanup = [f"{args.dir}/.bench-peer", args.local, f"{args.local}-fuse"]
        subprocess.run(Lab().exec_argv(primary, ["rm", "-rf", *cleanup]), check=False)
        problems = pair.teardown()
    if failed:
        print(f"peer_glusterfs: {failed}", file=sys.stderr)
    for problem in problems:
        print(f"peer_glusterfs: {problem}", file=sys.stderr)
    if failed or problems:
        return 1
    extra = {
        "primary": primary,
        "secondary": secondary,
        "seconds": args.seconds,
        "glusterfs_options": options,
        "glusterfs_version": version,
    }
    figures = figures_of(rows, extra)
    emit(figures)
    return 0 if all(f.passed is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
