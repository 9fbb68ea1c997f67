"""The replication link's own cost per 4 KiB write + barrier, its paths side by side
(issue 16), on this host, no lab, no FUSE.

    python -m benchmarks.link_paths [--rounds N] [--ops N]

A primary's ``PrimaryLink`` and a secondary's ``SecondarySession`` (its applier on tmpfs,
so the disk is out of the figure) in one process over a real TLS 1.3 connection on
loopback, certificates of a CA made for the run. Each op is a 4 KiB WRITE and an FSYNC
barrier, sent from the waiting task as the file system's barrier does, then waited for.
Rounds run the paths in turn, forwards then backwards:

- `sslstream`: the link as before link/direct.py: trio's ``SSLStream`` sends and
  receives, and each barrier waits inside a trio timeout of its own;
- `direct`: ``DirectTls`` and the link's one deadline task, the barrier parked until the
  receiving task wakes it;
- `inline`: as the file system's barrier runs now: ``direct``, and the acknowledgement
  read in the barrier's own task for up to ``INLINE_ACK_WAIT_S`` first
  (``PrimaryLink.collect_acks``), parked only when it is not in by then.

Figures: CPU time of the process (both ends) and wall time per op, each path's median,
and ``direct / sslstream`` and ``inline / direct`` round by round. The secondary's hot
path (its lane) is the same in all; the difference is the primary's.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from benchmarks.peer_glusterfs import node_certificates
from benchmarks.report import Figure, emit
from ha_runtime.replication.journal import Op, Record, derive_key
from ha_runtime.replication.link import framing
from ha_runtime.replication.link import tls as T
from ha_runtime.replication.link.framing import Conn
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.link.secondary import SecondarySession
from ha_runtime.replication.primary.sink import INLINE_ACK_WAIT_S
from ha_runtime.replication.secondary.applier import Applier

BENCHMARK = "link_paths"
PATHS = ("sslstream", "direct", "inline")
# Each ratio: (new path, the path it is measured against).
RATIOS = (("direct", "sslstream"), ("inline", "direct"))
KEY = derive_key(b"hapair-bench-link-paths" * 2)
WARMUP = 200
TMPFS = "/dev/shm"


@contextmanager
def site_tls() -> Iterator[dict[str, T.TlsFiles]]:
    """node1's and node2's TLS files, from a CA made for this run."""
    with tempfile.TemporaryDirectory(prefix="hapair-bench-link-") as tmp:
        out = {}
        for node, files in node_certificates(("node1", "node2")).items():
            d = Path(tmp) / node
            d.mkdir()
            for name, text in files.items():
                (d / name).write_text(text)
            out[node] = T.TlsFiles(
                ca=d / "glusterfs.ca", cert=d / "glusterfs.pem", key=d / "glusterfs.key"
            )
        yield out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one_round(path: str, ops: int, tls: dict[str, T.TlsFiles], where: Path) -> dict[str, Any]:
    # The SSLStream path: Conn finds no TLS parts, so it keeps to the stream's own methods.
    names = vars(framing)
    real = names["tls_parts"]
    names["tls_parts"] = real if path != "sslstream" else (lambda stream: None)
    try:
        return await _measure(path, ops, tls, where)
    finally:
        names["tls_parts"] = real


async def _measure(path: str, ops: int, tls: dict[str, T.TlsFiles], where: Path) -> dict[str, Any]:
    applier = Applier(where)
    port = _free_port()

    async def barrier() -> int:
        applier.barrier()
        return applier.applied_seq

    async def control(obj: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        return {}, b""

    async def session(conn: Conn) -> None:
        await SecondarySession(conn, applier.apply, barrier, control).run()

    async def serve(task_status: Any) -> None:
        await T.serve(
            addresses=["127.0.0.1"], port=port, peer="node1",
            ctx=T.server_context(tls["node2"]), key=KEY, handler=session,
            task_status=task_status,
        )  # fmt: skip

    async with trio.open_nursery() as n:
        await n.start(serve)
        conn = await T.connect(
            addresses=[("127.0.0.1", port)], peer="node2",
            ctx=T.client_context(tls["node1"]), key=KEY, timeout=5,
        )  # fmt: skip
        link = PrimaryLink(conn, timeout=3.0)
        n.start_soon(link.run)
        link.submit(Record(0, Op.CREATE, b"f", mode=0o100644))
        data = os.urandom(4096)

        async def op(i: int) -> None:
            link.submit(Record(0, Op.WRITE, b"f", offset=(i % 64) * 4096, data=data))
            seq = link.submit(Record(0, Op.FSYNC, b"f"), flushed=True)
            await link.flush()
            if path == "inline" and link.collect_acks(seq, INLINE_ACK_WAIT_S):
                return
            # The path before: a trio timeout per barrier (an explicit timeout still takes it).
            await link.wait_acked(seq, timeout=3.0 if path == "sslstream" else None)

        for i in range(WARMUP):
            await op(i)
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(ops):
            await op(i)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        n.cancel_scope.cancel()
    return {"path": path, "cpu_us": cpu / ops * 1e6, "wall_us": wall / ops * 1e6}


def figures_of(rows: list[dict[str, Any]], extra: dict[str, Any]) -> list[Figure]:
    def pick(path: str, key: str) -> list[float]:
        return [float(r[key]) for r in rows if r["path"] == path]

    figures = []
    for key, what in (("cpu_us", "CPU of both ends"), ("wall_us", "wall time")):
        name = key.removesuffix("_us")
        figures.append(Figure(BENCHMARK, f"{name}_per_op_sslstream", "µs/op",
                              pick("sslstream", key), extra=extra))  # fmt: skip
        for new, old in RATIOS:
            a, b = pick(old, key), pick(new, key)
            figures += [
                Figure(BENCHMARK, f"{name}_per_op_{new}", "µs/op", b,
                       anchor=f"{name}_per_op_{old}", extra=extra),
                Figure(BENCHMARK, f"{name}_{new}_over_{old}", f"{new}/{old}",
                       [y / max(x, 1e-9) for x, y in zip(a, b, strict=True)],
                       extra={"what": f"{what} per 4 KiB write + barrier, round by round"}),
            ]  # fmt: skip
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ops", type=int, default=3000)
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with site_tls() as tls:
        for r in range(args.rounds):
            for path in PATHS if r % 2 == 0 else PATHS[::-1]:
                with tempfile.TemporaryDirectory(dir=TMPFS, prefix="hapair-bench-link-") as d:
                    row = trio.run(one_round, path, args.ops, tls, Path(d))
                print(
                    f"link_paths: round {r} {path}: {row['cpu_us']:.0f} µs CPU, "
                    f"{row['wall_us']:.0f} µs wall per op",
                    file=sys.stderr,
                )
                rows.append(row)
    emit(figures_of(rows, {"ops": args.ops, "rounds": args.rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
