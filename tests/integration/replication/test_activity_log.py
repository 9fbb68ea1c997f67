"""A primary crashing in sync comes back with an incremental resync (its activity log), or a
full one when that log cannot be trusted. Two services on loopback, one FUSE mount at a time.

Needs root and /dev/fuse (both available here and in CI)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
from fusepair import configs, in_step, write_sync

from ha_runtime.config import ReplicationSettings
from ha_runtime.generation import Generation, GenerationStore, GenRecord
from ha_runtime.replication.activitylog import AL_EXTENT, ActivityLog
from ha_runtime.replication.context import Event
from ha_runtime.replication.journal import Op, Record
from ha_runtime.replication.service import ReplicationService
from tests.sitefactory import free_tcp_port

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="root+FUSE"),
]


def test_primary_crashing_in_sync_returns_with_an_incremental_resync(tmp_path: Path) -> None:  # noqa: PLR0915
    module, c1, c2 = configs(tmp_path)
    st = ReplicationSettings(port=free_tcp_port(), timeout_ms=1000, networks=("lan",),
                             site_key=b"k" * 48)  # fmt: skip
    app = tmp_path / "app"
    b1 = tmp_path / "node1/replica/demo/0"
    b2 = tmp_path / "node2/replica/demo/0"
    g1 = Generation().advance()
    for c in (c1, c2):
        GenerationStore(c.state_dir, module.name).save(GenRecord(g1))
    events: list[Event] = []

    async def until(cond: Any, timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            while not cond():
                await trio.sleep(0.05)

    async def io(fn: Any, *a: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *a)

    async def pair(prim: ReplicationService, sec: ReplicationService) -> Any:
        """Run both until the returned crash() (no drain: the logs stay as they are)."""
        scope = trio.CancelScope()
        gone = trio.Event()

        async def run() -> None:
            try:
                with scope:
                    async with trio.open_nursery() as n:
                        await n.start(sec.run_secondary)
                        await n.start(prim.run_primary)
            finally:
                gone.set()

        async def crash() -> None:
            scope.cancel()
            await gone.wait()  # unmounted (never stat the mount of a server being stopped)

        nursery.start_soon(run)
        await until(lambda: prim.status().state == "sync" and in_step(prim))
        return crash

    nursery: trio.Nursery

    async def main() -> None:  # noqa: PLR0915 (one story, told in order)
        nonlocal nursery
        async with trio.open_nursery() as nursery:
            b1.mkdir(parents=True)
            b2.mkdir(parents=True)
            big = os.urandom(6 * AL_EXTENT)
            (b1 / "big").write_bytes(big)
            (b2 / "big").write_bytes(big)
            for b in (b1, b2):  # identical copies at g1, both know it
                (b.parent.parent / "demo.0.synced").write_text(f"{g1.current:016x}\n")
            p1 = ReplicationService(module, c1, st, on_event=events.append)
            crash = await pair(p1, ReplicationService(module, c2, st))
            assert not any(e.kind == "resync_full_needed" for e in events)

            # in sync: writes flow, each new extent or name hot in node1's activity log
            await io(write_sync, app / "big", b"A" * 4096, 2 * AL_EXTENT + 10)
            await io(write_sync, app / "small", b"s" * 3000)
            await io(os.mkdir, app / "dir")
            al_path = tmp_path / "node1/replica/demo.0.al"
            assert al_path.stat().st_size > 0
            await crash()

            # what node1 performed and never shipped when it crashed: recorded, then done
            al = ActivityLog(al_path)
            al.open()
            for rec in (Record(0, Op.WRITE, b"big", offset=2 * AL_EXTENT + 50, data=b"X"),
                        Record(0, Op.CREATE, b"ghost")):  # fmt: skip
                al.sync(al.note(rec, acked=0))
            al.close()
            with open(b1 / "big", "r+b") as f:
                f.seek(2 * AL_EXTENT + 50)
                f.write(b"X" * 100)
            (b1 / "ghost").write_bytes(b"never reached node2")

            # node2 takes over (a new generation), writes, then node1 returns as secondary
            GenerationStore(c2.state_dir, module.name).save(GenRecord(g1.advance()))
            seen = len(events)
            wire: list[int] = []
            p2 = ReplicationService(module, c2, st, on_event=events.append)
            s1 = ReplicationService(module, c1, st)

            async def alone_then_back() -> None:
                async with trio.open_nursery() as n:
                    await n.start(p2.run_primary)
                    await io(write_sync, app / "big", b"B" * 8192, 4 * AL_EXTENT)
                    await io(write_sync, app / "after", b"a" * 1000)
                    await n.start(s1.run_secondary)
                    await until(lambda: p2.status().state == "sync" and in_step(p2))
                    assert p2.primary.link is not None
                    wire.append(p2.primary.link.conn.bytes_sent)
                    rep = await p2.verify()
                    assert rep.equal, rep.differences
                    n.cancel_scope.cancel()

            await alone_then_back()
            mine = events[seen:]
            started = [e for e in mine if e.kind == "resync_started"]
            assert started and started[-1].detail["full"] is False, mine
            assert started[-1].detail["peer_activity"]["ranges"] >= 1
            assert not any(e.kind == "resync_full_needed" for e in mine), mine
            # on the wire: the blocks that differ in the hot file (a checksum delta), and
            # our own writes; not the 24 MiB file, nor its hot 4 MiB extent (sent whole before)
            assert wire and wire[0] <= 8192 + 1000 + 3000 + 4096 + (128 << 10), wire
            assert not (b1 / "ghost").exists()
            assert (b1 / "big").read_bytes() == (b2 / "big").read_bytes()
            # in sync again: the returning node's logs are gone
            assert not al_path.exists()
            assert not (tmp_path / "node1/replica/demo.0.dirty").exists()

            # node2's activity log damaged, node2 crashes: it will need a full resync
            p2b = ReplicationService(module, c2, st)
            crash = await pair(p2b, ReplicationService(module, c1, st))
            await io(write_sync, app / "big", b"C" * 100, 0)
            await crash()
            with open(tmp_path / "node2/replica/demo.0.al", "ab") as f:
                f.write(os.urandom(64 << 10))
            GenerationStore(c1.state_dir, module.name).save(
                GenRecord(GenerationStore(c2.state_dir, module.name).load().generation.advance())
            )
            seen = len(events)
            p1b = ReplicationService(module, c1, st, on_event=events.append)
            crash = await pair(p1b, ReplicationService(module, c2, st))
            mine = events[seen:]
            why = [e.detail["reason"] for e in mine if e.kind == "resync_full_needed"]
            assert why and "activity log is damaged" in why[0], mine
            assert [e.detail["full"] for e in mine if e.kind == "resync_started"] == [True]
            rep = await p1b.verify()
            assert rep.equal, rep.differences
            await crash()

    trio.run(main)
    assert not os.path.ismount(app)
