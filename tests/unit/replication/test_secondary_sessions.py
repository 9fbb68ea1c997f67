"""The secondary's listener: one session at a time on one Applier, bounded TLS handshakes,
and a session that fails in any way ends that link only (counted), never the service."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from ha_runtime.replication.journal import Op, Record, derive_key
from ha_runtime.replication.link.framing import Conn
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.link.secondary import ControlHandler, SecondarySession
from ha_runtime.replication.link.tls import TlsFiles
from ha_runtime.replication.secondary.applier import Applier
from tests.linkpair import connect_primary, serve_secondary
from tests.sitefactory import free_tcp_port

KEY = derive_key(b"s" * 48)


async def _connect(port: int, tls: TlsFiles) -> Conn:
    return await connect_primary(tls, KEY, port, timeout=5)


async def _serve(
    n: trio.Nursery, port: int, tls: TlsFiles, handler: Any, refused: list[str], **kw: Any
) -> None:
    await serve_secondary(n, tls, KEY, port, handler, on_refused=refused.append, **kw)


def _session_handler(
    applier: Applier, rejected: list[str], control: ControlHandler | None = None
) -> Callable[[Conn], Any]:
    """What ReplicationService.run_secondary runs per connection, on a real Applier."""

    async def barrier() -> int:
        await trio.to_thread.run_sync(applier.barrier)
        return applier.durable_seq

    async def barrier_control(obj: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        # as run_secondary's control requests but hello: everything applied made durable
        await trio.to_thread.run_sync(applier.barrier)
        return {}, b""

    async def handler(conn: Conn) -> None:
        await SecondarySession(
            conn, applier.apply, barrier, control or barrier_control,
            on_rejected=rejected.append, checkpoint_s=30,
        ).run()  # fmt: skip

    return handler


class _SlowDisk:
    """Records the inodes fsync'd, in order; the fsync of ``slow`` takes 1.5 s."""

    def __init__(self, slow: Path) -> None:
        self.slow = slow
        self.synced: list[int] = []
        self.started, self.done = threading.Event(), threading.Event()

    def spy(self, real: Callable[[int], None]) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            ino = os.fstat(fd).st_ino
            slow = self.slow.exists() and ino == self.slow.stat().st_ino
            if slow:
                self.started.set()
                time.sleep(1.5)
            real(fd)
            self.synced.append(ino)
            if slow:
                self.done.set()

        return sync


def test_a_new_session_cannot_have_its_fsync_acked_unsynced_by_the_old_ones_barrier(
    tmp_path: Path, site: dict[str, TlsFiles], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 1's barrier (a control request's) is in its thread (a slow fsync) when the
    primary reconnects. Session 2 writes b; the old barrier then ended by clearing the dirty set,
    b included, so session 2's FSYNC of b was acknowledged without any fsync of b."""
    root = tmp_path / "second"
    applier = Applier(root)
    disk = _SlowDisk(root / "a")
    monkeypatch.setattr(os, "fsync", disk.spy(os.fsync))
    monkeypatch.setattr(os, "fdatasync", disk.spy(os.fdatasync))
    synced, slow_started, slow_done = disk.synced, disk.started, disk.done
    port = free_tcp_port()
    rejected: list[str] = []
    refused: list[str] = []
    synced_at_ack: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            await _serve(n, port, site["node2"], _session_handler(applier, rejected), refused)
            link1 = PrimaryLink(await _connect(port, site["node1"]), timeout=10)
            n.start_soon(link1.run)
            link1.submit(Record(0, Op.CREATE, b"a", mode=0o100600))
            link1.submit(Record(0, Op.WRITE, b"a", data=b"a" * 100))
            link1.submit_control({"op": "list"})  # the secondary syncs a first, slowly
            await trio.to_thread.run_sync(slow_started.wait, 10)
            link2 = PrimaryLink(await _connect(port, site["node1"]), timeout=10)
            n.start_soon(link2.run)
            link2.submit(Record(0, Op.CREATE, b"b", mode=0o100600))
            link2.submit(Record(0, Op.WRITE, b"b", data=b"b" * 100))
            link2.ping()
            with trio.fail_after(10):
                await link2.wait_progress(lambda: link2.received_seq >= 2)
            await trio.to_thread.run_sync(slow_done.wait, 10)
            seq = link2.submit(Record(0, Op.FSYNC, b"b"))
            await link2.wait_acked(seq, timeout=10)
            synced_at_ack.extend(synced)
            n.cancel_scope.cancel()

    try:
        trio.run(main)
        b_ino = (root / "b").stat().st_ino
    finally:
        applier.close()
    assert b_ino in synced_at_ack, "session 2's FSYNC was acknowledged before b was fsync'd"
    assert rejected == []


def test_a_new_session_starts_only_once_the_old_one_has_returned(
    site: dict[str, TlsFiles],
) -> None:
    """The old handler may be in a thread (uncancellable) when the new connection comes."""
    port = free_tcp_port()
    order: list[str] = []
    refused: list[str] = []

    async def handler(conn: Conn) -> None:
        me = f"s{sum(1 for o in order if o.startswith('start')) + 1}"
        order.append(f"start {me}")
        try:
            if me == "s1":
                await trio.to_thread.run_sync(time.sleep, 1.0)
            await trio.sleep_forever()
        finally:
            order.append(f"end {me}")

    async def main() -> None:
        async with trio.open_nursery() as n:
            await _serve(n, port, site["node2"], handler, refused)
            c1 = await _connect(port, site["node1"])
            with trio.fail_after(5):
                while order != ["start s1"]:
                    await trio.sleep(0.01)
            c2 = await _connect(port, site["node1"])
            with trio.fail_after(5):
                while len(order) < 3:
                    await trio.sleep(0.01)
            await c1.aclose()
            await c2.aclose()
            n.cancel_scope.cancel()

    trio.run(main)
    assert order[:3] == ["start s1", "end s1", "start s2"]


def test_handshakes_are_bounded_and_the_excess_closed_and_counted(
    site: dict[str, TlsFiles],
) -> None:
    """A flood of connections that never finish their handshake used to be served all at
    once, each holding a task and a TLS state for the whole handshake timeout."""
    port = free_tcp_port()
    refused: list[str] = []
    rejected: list[str] = []
    sessions: list[str] = []

    async def handler(conn: Conn) -> None:
        sessions.append(conn.peer)

    closed_fast: list[bool] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            await _serve(
                n, port, site["node2"], handler, refused, handshake_timeout=3.0,
                on_rejected=rejected.append,
            )  # fmt: skip
            stalled = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
            await trio.sleep(0.3)  # the four are in their handshakes
            excess = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(6)]
            for s in excess:
                with trio.move_on_after(1.0):
                    closed_fast.append(await s.receive_some(1) == b"")
                    continue
                closed_fast.append(False)
            for s in stalled + excess:
                await s.aclose()
            # the slots are free again: the real primary gets in
            conn = await _connect(port, site["node1"])
            with trio.fail_after(5):
                while not sessions:
                    await trio.sleep(0.01)
            await conn.aclose()
            n.cancel_scope.cancel()

    trio.run(main)
    assert closed_fast == [True] * 6
    assert rejected == ["handshake_busy"] * 6
    assert len(refused) == 4  # the stalled ones, at their close
    assert sessions == ["node1"]


def test_an_unexpected_error_in_a_session_ends_that_link_only_and_is_counted(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    """A control request that overflows the stack (RecursionError) or a record the applier
    refuses ends the session, counted; the listener serves the next connection."""
    applier = Applier(tmp_path / "second")
    rejected: list[str] = []
    refused: list[str] = []

    async def control(obj: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        return {"parsed": json.loads(body)}, b""  # "[[[[..." overflows the decoder's stack

    port = free_tcp_port()
    lost: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            await _serve(
                n, port, site["node2"], _session_handler(applier, rejected, control), refused
            )
            for attempt in ("control", "record", "refused", "ok"):
                link = PrimaryLink(await _connect(port, site["node1"]), timeout=5)
                n.start_soon(link.run)
                if attempt == "control":
                    link.submit_control({"op": "x"}, b"[" * 200_000)
                elif attempt == "record":
                    link.submit(Record(0, Op.WRITE, b"missing/f", data=b"x"))
                elif attempt == "refused":  # flags no setxattr takes
                    link.submit(Record(0, Op.SETXATTR, b"", name=b"user.k", flags=1 << 31))
                else:
                    link.submit(Record(0, Op.CREATE, b"f", mode=0o100600))
                    seq = link.submit(Record(0, Op.FSYNC, b"f"))
                    await link.wait_acked(seq)
                    break
                with trio.fail_after(5):
                    await link.wait_lost()
                lost.append(link.lost_reason or "")
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        applier.close()
    assert (tmp_path / "second/f").exists()
    assert rejected == ["session_error", "apply_failed", "apply_refused"], rejected
    assert "secondary error" in lost[1] and "secondary error" in lost[2]
