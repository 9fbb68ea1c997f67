"""The FUSE file system's own ceiling under its options (issue 16), on this host, no lab.

    python -m benchmarks.fuse_options [--rounds N] [--seconds S]

The primary's PassthroughFS (ha_runtime.replication.primary.fs) over a local directory,
with a sink that only fsyncs locally (the `fuse_only` place of benchmarks/replication.py),
measured with each option in turn, alternating, `--rounds` times: 1 MiB sequential writes
(64 MiB, then fdatasync) and 4 KiB write + fdatasync for `--seconds`. Each run also counts
the sizes of the write requests the file system received, to show how the kernel split
the application's writes. Options compared (one file system process per run, since
pyfuse3 mounts once per process):

- `plain`: as the runtime mounts it (writeback cache off, libfuse's default request size);
- `writeback`: `enable_writeback_cache = True` (the kernel aggregates writes in its page
  cache and sends them at writeback; durability still at fsync).

Ratios are `writeback / plain` of the same round (side by side, one noisy machine).
Needs root (FUSE mount, allow_other).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from benchmarks.replication import LOCAL_ONLY_SINK
from benchmarks.report import Figure, emit

OPTIONS = ("plain", "writeback")

RUN_SCRIPT = (
    r"""
import collections, functools, json, os, sys, time, trio
from pathlib import Path
from ha_runtime.replication.primary import fs as fusefs

base, option, seconds = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
backing, mnt = base / "backing", base / "mnt"
sizes = collections.Counter()
write = fusefs.PassthroughFS.write

async def counted(self, fh, off, buf):
    sizes[len(buf)] += 1
    return await write(self, fh, off, buf)

fusefs.PassthroughFS.write = counted
fusefs.PassthroughFS.enable_writeback_cache = option == "writeback"
"""
    + LOCAL_ONLY_SINK
    + r"""
def work():
    data = os.urandom(1 << 20)
    t = time.perf_counter()
    with open(mnt / "big", "wb") as f:
        for _ in range(64):
            f.write(data)
        f.flush()
        os.fdatasync(f.fileno())
    mbps = 64 * 1.048576 / (time.perf_counter() - t)
    block, n, t = os.urandom(4096), 0, time.perf_counter()
    with open(mnt / "small", "wb") as f:
        while time.perf_counter() - t < seconds:
            f.write(block)
            f.flush()
            os.fdatasync(f.fileno())
            n += 1
    return mbps, n / (time.perf_counter() - t)

async def main():
    backing.mkdir(parents=True)
    mnt.mkdir(parents=True)
    serve = functools.partial(fusefs.serve, backing=backing, mountpoint=mnt,
                              sink=LocalOnly(), fsname="hapair-fuse-options")
    async with trio.open_nursery() as n:
        await n.start(serve)
        mbps, ops = await trio.to_thread.run_sync(work)
        n.cancel_scope.cancel()
    print(json.dumps({"mbps": mbps, "ops": ops, "sizes": dict(sizes)}))

trio.run(main)
"""
)


def run_once(option: str, seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="hapair-fuse-options-") as tmp:
        proc = subprocess.run(
            [sys.executable, "-c", RUN_SCRIPT, tmp, option, str(seconds)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        subprocess.run(["umount", "-l", f"{tmp}/mnt"], capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{option}: the FUSE run failed: {proc.stderr.strip()[-400:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def figures_of(rounds: Sequence[dict[str, dict[str, object]]]) -> list[Figure]:
    """One figure per option and workload, and the writeback/plain ratios per round."""
    out: list[Figure] = []
    for key, unit, name in (("mbps", "MB/s", "1m_sequential"), ("ops", "ops/s", "4k_fdatasync")):
        for option in OPTIONS:
            samples = [float(str(r[option][key])) for r in rounds]
            sizes = [r[option]["sizes"] for r in rounds]
            out.append(
                Figure(
                    "fuse_options",
                    f"{name}_{option}",
                    unit,
                    samples,
                    extra={"write_request_sizes": sizes},
                    anchor="" if option == "plain" else f"{name}_plain",
                )
            )
        ratios = [
            float(str(r["writeback"][key])) / float(str(r["plain"][key]))
            for r in rounds
            if float(str(r["plain"][key])) > 0
        ]
        out.append(Figure("fuse_options", f"{name}_ratio_writeback_to_plain", "x", ratios))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    rounds = []
    for i in range(args.rounds):
        order = OPTIONS if i % 2 == 0 else tuple(reversed(OPTIONS))  # neither always first
        rounds.append({option: run_once(option, args.seconds) for option in order})
    figures = figures_of(rounds)
    emit(figures)
    for option in OPTIONS:
        sizes: dict[str, int] = {}
        for r in rounds:
            for size, count in dict(r[option]["sizes"]).items():  # type: ignore[call-overload]
                sizes[size] = sizes.get(size, 0) + int(count)
        top = sorted(sizes.items(), key=lambda kv: -kv[1])[:4]
        print(f"{option}: write requests by size (bytes: count) {dict(top)}")
    ratio = [f for f in figures if f.figure.endswith("ratio_writeback_to_plain")]
    for f in ratio:
        print(f"{f.figure}: median {statistics.median(f.samples):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
