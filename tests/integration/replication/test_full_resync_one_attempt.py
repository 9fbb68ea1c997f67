"""A full resync of a large file with 1 % changed completes in one attempt over a real link
with a short timeout: the delta travels in pieces far below the frame limit, the secondary
applies each in a worker thread while it keeps answering keepalives, and the bytes on the
wire are about the changed ones. Real TLS on loopback, real SecondarySession and Applier."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import trio

from ha_runtime.replication import delta as D
from ha_runtime.replication import journal as J
from ha_runtime.replication import resync, tree
from ha_runtime.replication.dirtylog import DirtyState
from ha_runtime.replication.journal import derive_key
from ha_runtime.replication.link.framing import Conn
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.link.secondary import SecondarySession
from ha_runtime.replication.link.tls import TlsFiles
from ha_runtime.replication.resync.progress import Progress
from ha_runtime.replication.secondary.applier import Applier
from tests.linkpair import connect_primary, serve_secondary
from tests.sitefactory import free_tcp_port

KEY = derive_key(b"k" * 48)
MIB = 1 << 20
SIZE = 256 * MIB
BLOCK = 4096


def _site(tmp: Path) -> dict[str, TlsFiles]:
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location(
        "replication_pki", Path(__file__).parents[2] / "unit/replication/conftest.py"
    )
    assert spec and spec.loader
    pki = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pki)
    site: dict[str, TlsFiles] = pki.make_site(tmp / "pki", "a", ("node1", "node2"))
    return site


def test_a_large_full_resync_completes_in_one_attempt(tmp_path: Path) -> None:
    site = _site(tmp_path)
    prim, peer = tmp_path / "prim", tmp_path / "peer"
    prim.mkdir()
    peer.mkdir()
    rnd = random.Random(3)
    with open(peer / "big", "wb") as f:
        for _ in range(SIZE // (16 * MIB)):
            f.write(rnd.randbytes(16 * MIB))
    shutil.copyfile(peer / "big", prim / "big")
    changed = 0
    spoiled: set[int] = set()  # blocks of the delta's size that differ
    bs = D.block_size_for(SIZE)
    with open(prim / "big", "r+b") as f:  # 1 % in scattered 4 KiB blocks
        for off in sorted(rnd.sample(range(SIZE // BLOCK), SIZE // BLOCK // 100)):
            f.seek(off * BLOCK)
            f.write(rnd.randbytes(BLOCK))
            changed += BLOCK
            spoiled.add(off * BLOCK // bs)
    port = free_tcp_port()
    applier = Applier(peer)
    refused: list[str] = []

    async def barrier() -> int:
        await trio.to_thread.run_sync(applier.barrier)
        return applier.durable_seq

    async def control(obj: dict[str, object], body: bytes) -> tuple[dict[str, object], bytes]:
        await trio.to_thread.run_sync(applier.barrier)
        if obj.get("op") == "list":
            return {"tree": await trio.to_thread.run_sync(tree.list_tree, peer)}, b""
        if obj.get("op") == "sig":
            p = os.fsencode(peer / str(obj["path"]))
            return {}, (await trio.to_thread.run_sync(D.signature_file, p)).encode()
        return {}, b""

    async def handler(conn: Conn) -> None:
        await SecondarySession(conn, applier.apply, barrier, control,
                                 on_rejected=refused.append).run()  # fmt: skip

    lost: list[str | None] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            await serve_secondary(n, site["node2"], KEY, port, handler)
            conn = await connect_primary(site["node1"], KEY, port)
            # the lab's timeout: a keepalive unanswered for 1 s and the resync starts over
            link = PrimaryLink(conn, timeout=1.0)
            n.start_soon(link.run)
            with trio.fail_after(300):
                await resync.run(link, prim, DirtyState(), Progress(), full=True,
                                 changes=DirtyState)  # fmt: skip
                seq = link.submit(J.Record(0, J.Op.FSYNC, b""))
                await link.wait_acked(seq, timeout=60)
            lost.append(link.lost_reason)
            lost.append(str(conn.bytes_sent))
            n.cancel_scope.cancel()

    trio.run(main)
    applier.close()
    reason, sent = lost[0], int(lost[1] or 0)
    figures = {"changed": changed, "delta_blocks": len(spoiled) * bs, "sent": sent}
    print(figures)
    assert reason is None and not refused, (reason, refused)
    assert (peer / "big").read_bytes() == (prim / "big").read_bytes()
    # the blocks that differ at the delta's block size (rsync's granularity: a 4 KiB change
    # costs one whole block) plus framing, not the file
    assert sent <= 1.1 * len(spoiled) * bs + (256 << 10), figures
