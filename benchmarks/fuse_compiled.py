"""How far a compiled FUSE daemon would raise the FUSE ceiling (issue 16), on this host.

    python -m benchmarks.fuse_compiled [--rounds N] [--seconds S]

The replication benchmark's own workloads (`benchmarks.replication.NODE_SCRIPT`: 4 KiB
write + fdatasync, 256 MiB in 1 MiB writes then fsync, SQLite WAL commits as the demo
application makes them), each in its own process, in four places side by side, rounds
alternating the order:

- `local`: a directory on this host's disk;
- `pyfuse3`: the runtime's PassthroughFS (`ha_runtime.replication.primary.fs`) over a
  directory on the same disk, with the sink of `fuse_only` (records nothing, fsyncs
  locally): what the runtime's FUSE layer alone can reach, in a server process of its own;
- `c_single`, `c_threads`: libfuse's own C passthrough (`passthrough_fh`, from Debian's
  libfuse3-dev examples, compiled here with gcc at run time, GPLv2, by Miklos Szeredi; not
  part of hapair), single-threaded (`-s`, as the runtime's one event loop) and with its
  worker threads, both with `default_permissions,allow_other` and zero cache timeouts as
  the runtime mounts.

`*_c_over_pyfuse3` is what a compiled FUSE daemon would give over the runtime's FUSE layer,
before any replication: the ceiling that lever raises. Needs root (FUSE mounts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from benchmarks.replication import FUSE_SCRIPT, NODE_SCRIPT
from benchmarks.report import Figure, emit

EXAMPLES = Path("/usr/share/doc/libfuse3-dev/examples")
PLACES = ("local", "pyfuse3", "c_single", "c_threads")
WORKLOADS = (("4k_fdatasync", "ops", "ops/s"), ("1m_sequential", "mbps", "MB/s"),
             ("sqlite_commits", "commits", "commits/s"))  # fmt: skip


def compile_passthrough(out: Path) -> Path:
    """libfuse's passthrough_fh, built from the installed example (gcc, pkg-config fuse3)."""
    src = EXAMPLES / "passthrough_fh.c"
    if not src.exists():
        raise RuntimeError(f"{src} missing: install libfuse3-dev (make setup does)")
    flags = subprocess.run(
        ["pkg-config", "fuse3", "--cflags", "--libs"], capture_output=True, text=True, check=True
    ).stdout.split()
    exe = out / "passthrough_fh"
    subprocess.run(
        ["gcc", "-O2", "-Wall", str(src), f"-I{EXAMPLES}", *flags, "-o", str(exe)],
        check=True, capture_output=True,
    )  # fmt: skip
    return exe


def _wait_mounted(mnt: Path, proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 20
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: the file system did not mount")
        time.sleep(0.05)


@contextmanager
def place(name: str, base: Path, exe: Path) -> Iterator[Path]:
    """The directory the workloads write in for ``name``, mounted for the time of the block."""
    backing, mnt = base / f"{name}-backing", base / f"{name}-mnt"
    backing.mkdir()
    if name == "local":
        yield backing
        return
    mnt.mkdir()
    if name == "pyfuse3":
        argv = [sys.executable, "-c", FUSE_SCRIPT, str(backing), str(mnt)]
    else:
        opts = f"modules=subdir,subdir={backing},default_permissions,allow_other,fsname=c-{name}"
        opts += ",max_threads=10"  # libfuse 3.14 warns about its own default otherwise
        argv = [str(exe), "-f", *(["-s"] if name == "c_single" else []), "-o", opts, str(mnt)]
    # The runtime's server unmounts when its standard input closes; libfuse's on umount.
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        _wait_mounted(mnt, proc, name)
        yield mnt
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        if name != "pyfuse3":
            subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def run_workload(where: Path, workload: str, seconds: float) -> dict[str, float]:
    """One workload in a process of its own (the same code as on the lab's nodes)."""
    proc = subprocess.run(
        [sys.executable, "-c", NODE_SCRIPT, str(where / "w"), workload, str(seconds),
         str(time.time())],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{workload} in {where}: {proc.stderr.strip()[-400:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def one_round(order: Sequence[str], exe: Path, seconds: float) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in order:
        # /var/tmp: the host's disk (/tmp may be a tmpfs, with no fsync cost at all)
        with (
            tempfile.TemporaryDirectory(prefix="hapair-fuse-compiled-", dir="/var/tmp") as tmp,
            place(name, Path(tmp), exe) as where,
        ):
            got: dict[str, float] = {}
            for workload, key, _ in WORKLOADS:
                got[workload] = float(run_workload(where, workload, seconds)[key])
            out[name] = got
    return out


def figures_of(rounds: Sequence[dict[str, dict[str, float]]]) -> list[Figure]:
    out: list[Figure] = []
    for workload, _, unit in WORKLOADS:
        for name in PLACES:
            anchor = "" if name == "local" else f"{workload}_local"
            samples = [r[name][workload] for r in rounds]
            out.append(Figure("fuse_compiled", f"{workload}_{name}", unit, samples, anchor=anchor))
        for name in ("c_single", "c_threads"):
            ratios = [r[name][workload] / r["pyfuse3"][workload] for r in rounds]
            out.append(
                Figure("fuse_compiled", f"{workload}_{name}_over_pyfuse3", "x", ratios,
                       extra={"what": "compiled FUSE passthrough / the runtime's FUSE layer"})
            )  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    build = Path(tempfile.mkdtemp(prefix="hapair-passthrough-"))
    try:
        exe = compile_passthrough(build)
        rounds = []
        for i in range(args.rounds):
            order = PLACES if i % 2 == 0 else tuple(reversed(PLACES))  # none always first
            rounds.append(one_round(order, exe, args.seconds))
    finally:
        shutil.rmtree(build, ignore_errors=True)
    emit(figures_of(rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
