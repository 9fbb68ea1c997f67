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
- `pyfuse3_bare`: a minimal pyfuse3 passthrough (handlers that make the system call and
  nothing else): what pyfuse3 and trio cost per request, whatever the handlers do;
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
PLACES = ("local", "pyfuse3", "pyfuse3_bare", "c_single", "c_threads")
WORKLOADS = (("4k_fdatasync", "ops", "ops/s"), ("1m_sequential", "mbps", "MB/s"),
             ("sqlite_commits", "commits", "commits/s"))  # fmt: skip


# pyfuse3 itself: handlers that do the system call and nothing else (a flat directory is
# all the workloads need). As fast as the runtime's layer means the cost is pyfuse3's and
# trio's per request, not the runtime's handlers.
BARE_SCRIPT = r"""
import errno, os, sys, trio, pyfuse3

STAT = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blocks",
        "st_atime_ns", "st_mtime_ns", "st_ctime_ns")


class Bare(pyfuse3.Operations):
    def __init__(self, root):
        super().__init__()
        self.root = root
        self.names = {pyfuse3.ROOT_INODE: root}

    def _attr(self, p):
        st = os.lstat(p)
        a = pyfuse3.EntryAttributes()
        for k in STAT:
            setattr(a, k, getattr(st, k))
        a.st_blksize, a.generation, a.entry_timeout, a.attr_timeout = 4096, 0, 0, 0
        a.st_ino = pyfuse3.ROOT_INODE if p == self.root else st.st_ino
        self.names[a.st_ino] = p
        return a

    def _path(self, parent, name):
        return os.path.join(self.names[parent], os.fsdecode(name))

    async def lookup(self, parent, name, ctx=None):
        try:
            return self._attr(self._path(parent, name))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def getattr(self, ino, ctx=None):
        return self._attr(self.names[ino])

    async def setattr(self, ino, attr, fields, fh, ctx):
        if fields.update_size:
            os.truncate(self.names[ino], attr.st_size)
        return self._attr(self.names[ino])

    async def getxattr(self, ino, name, ctx):
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def open(self, ino, flags, ctx):
        return pyfuse3.FileInfo(fh=os.open(self.names[ino], flags & ~os.O_CREAT))

    async def create(self, parent, name, mode, flags, ctx):
        p = self._path(parent, name)
        return pyfuse3.FileInfo(fh=os.open(p, flags | os.O_CREAT, mode)), self._attr(p)

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        os.close(fh)

    async def unlink(self, parent, name, ctx):
        os.unlink(self._path(parent, name))

    async def mkdir(self, parent, name, mode, ctx):
        p = self._path(parent, name)
        os.mkdir(p, mode)
        return self._attr(p)

    async def opendir(self, ino, ctx):
        return ino

    async def readdir(self, fh, off, token):
        pass

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        return pyfuse3.StatvfsData()


async def main():
    pyfuse3.init(Bare(sys.argv[1]), sys.argv[2], {"default_permissions", "allow_other"})
    async with trio.open_nursery() as n:
        n.start_soon(pyfuse3.main)
        print("mounted", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the benchmark closes stdin
        n.cancel_scope.cancel()
    pyfuse3.close(unmount=True)

trio.run(main)
"""


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
    if name.startswith("pyfuse3"):
        script = FUSE_SCRIPT if name == "pyfuse3" else BARE_SCRIPT
        argv = [sys.executable, "-c", script, str(backing), str(mnt)]
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
        if not name.startswith("pyfuse3"):
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
        for name in ("pyfuse3_bare", "c_single", "c_threads"):
            ratios = [r[name][workload] / r["pyfuse3"][workload] for r in rounds]
            out.append(
                Figure("fuse_compiled", f"{workload}_{name}_over_pyfuse3", "x", ratios,
                       extra={"what": f"{name} / the runtime's FUSE layer"})
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
