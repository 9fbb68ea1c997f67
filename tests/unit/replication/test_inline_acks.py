"""``PrimaryLink.collect_acks``: a barrier reads its acknowledgement in its own task, in
place of the receiving task, on a real TLS link over loopback. Every frame read there is
handled as the receiver would (acks, replies, a rejected frame, the end of the stream), the
receiver goes on afterwards with nothing lost or reordered, and nothing is read while the
receiver cannot be stood in for."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

from ha_runtime.replication.journal import Kind, Op, Record, derive_key, encode_frame
from ha_runtime.replication.link.framing import Conn
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.link.secondary import SecondarySession
from ha_runtime.replication.link.tls import TlsFiles
from ha_runtime.replication.secondary.applier import Applier
from tests.linkpair import connect_primary, serve_secondary
from tests.sitefactory import free_tcp_port

KEY = derive_key(b"i" * 48)


def _pair(
    site: dict[str, TlsFiles],
    handler: Callable[[Conn], Awaitable[None]],
    body: Callable[[PrimaryLink], Awaitable[None]],
) -> None:
    """node2 serves ``handler`` in a thread and event loop of its own (a barrier reading
    inline holds the primary's loop, as the peer's process would not be), node1 runs
    ``body`` on its link."""
    port = free_tcp_port()
    ready = threading.Event()
    held: list[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = []

    async def secondary() -> None:
        async with trio.open_nursery() as n:
            await serve_secondary(n, site["node2"], KEY, port, handler)
            held.append((trio.lowlevel.current_trio_token(), n.cancel_scope))
            ready.set()

    t = threading.Thread(target=trio.run, args=(secondary,), daemon=True)
    t.start()
    assert ready.wait(10)

    async def main() -> None:
        async with trio.open_nursery() as n:
            link = PrimaryLink(await connect_primary(site["node1"], KEY, port), timeout=3)
            n.start_soon(link.run)
            await trio.sleep(0.05)  # the receiving task is parked on the socket
            with trio.fail_after(10):
                await body(link)
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        token, scope = held[0]
        token.run_sync_soon(scope.cancel)
        t.join(10)


def _session(
    applier: Applier, apply: Callable[[Record], None] | None = None
) -> Callable[[Conn], Awaitable[None]]:
    async def barrier() -> int:
        applier.barrier()
        return applier.applied_seq

    async def control(obj: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        return {"echo": obj.get("n")}, b""

    async def handler(conn: Conn) -> None:
        await SecondarySession(conn, apply or applier.apply, barrier, control).run()

    return handler


async def _write_and_barrier(link: PrimaryLink, i: int) -> int:
    link.submit(Record(0, Op.WRITE, b"f", offset=4 * i, data=b"%04d" % i))
    seq = link.submit(Record(0, Op.FSYNC, b"f"), flushed=True)
    await link.flush()
    return seq


def test_barriers_collect_their_acks_inline_and_the_receiver_goes_on(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    applier = Applier(tmp_path / "second")
    got: dict[str, Any] = {}

    async def body(link: PrimaryLink) -> None:
        link.submit(Record(0, Op.CREATE, b"f", mode=0o100644))
        inline = 0
        for i in range(200):
            seq = await _write_and_barrier(link, i)
            if link.collect_acks(seq, 1.0):
                inline += 1
                assert link.durable_seq >= seq
            else:
                await link.wait_acked(seq)
        got["inline"] = inline
        # The receiving task still reads what comes after: a control reply, then acks.
        got["reply"] = (await link.request({"op": "echo", "n": 7}))[0]
        last = await _write_and_barrier(link, 200)
        await link.wait_acked(last)
        got["durable"], got["last"] = link.durable_seq, last
        got["lost"] = link.lost_reason

    _pair(site, _session(applier), body)
    # The secondary answers well within a second: every barrier found its ack inline.
    assert got["inline"] == 200
    assert got["reply"]["echo"] == 7
    assert got["durable"] >= got["last"] and got["lost"] is None
    data = (tmp_path / "second" / "f").read_bytes()
    assert data == b"".join(b"%04d" % i for i in range(201))


def test_a_late_ack_is_left_to_the_receiver_and_nothing_is_lost(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    applier = Applier(tmp_path / "second")
    got: dict[str, Any] = {}

    def slow_apply(rec: Record) -> None:
        if rec.op == Op.FSYNC:
            time.sleep(0.2)  # longer than the budget below
        applier.apply(rec)

    async def body(link: PrimaryLink) -> None:
        link.submit(Record(0, Op.CREATE, b"f", mode=0o100644))
        seq = await _write_and_barrier(link, 0)
        t = time.monotonic()
        got["inline"] = link.collect_acks(seq, 0.02)
        got["held"] = time.monotonic() - t
        await link.wait_acked(seq)  # the receiving task takes it
        got["durable"], got["seq"], got["lost"] = link.durable_seq, seq, link.lost_reason

    _pair(site, _session(applier, slow_apply), body)
    assert got["inline"] is False
    assert 0.015 <= got["held"] < 0.15  # the budget, not the secondary's 0.2 s
    assert got["durable"] >= got["seq"] and got["lost"] is None


def test_nothing_is_read_while_the_receiver_is_not_parked_on_the_socket(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    applier = Applier(tmp_path / "second")
    got: dict[str, Any] = {}

    async def body(link: PrimaryLink) -> None:
        link.submit(Record(0, Op.CREATE, b"f", mode=0o100644))
        seq = await _write_and_barrier(link, 0)
        direct = link.conn._direct
        assert direct is not None and direct.waiting
        direct.waiting = False  # as while it holds plaintext it decrypted
        try:
            got["inline"] = link.collect_acks(seq, 0.5)
        finally:
            direct.waiting = True
        await link.wait_acked(seq)
        got["ok"] = link.durable_seq >= seq and link.lost_reason is None

    _pair(site, _session(applier), body)
    assert got == {"inline": False, "ok": True}


def _rogue(reply: Callable[[Conn], Awaitable[None]]) -> Callable[[Conn], Awaitable[None]]:
    """A secondary that reads the primary's first frames, then sends ``reply``'s bytes."""

    async def handler(conn: Conn) -> None:
        await conn.recv()
        await reply(conn)
        await trio.sleep(5)

    return handler


def test_a_rejected_frame_read_inline_fails_the_link_and_is_counted(
    site: dict[str, TlsFiles],
) -> None:
    got: dict[str, Any] = {}

    async def garbage(conn: Conn) -> None:
        await conn.send(b"\x00" * 64)

    async def body(link: PrimaryLink) -> None:
        seq = await _write_and_barrier(link, 0)
        got["inline"] = link.collect_acks(seq, 2.0)
        got["lost"], got["rejected"] = link.lost_reason, dict(link.rejected)

    _pair(site, _rogue(garbage), body)
    assert got["inline"] is False
    assert got["lost"] and got["lost"].startswith("connection closed")
    assert sum(got["rejected"].values()) == 1


def test_an_unexpected_frame_read_inline_fails_the_link(site: dict[str, TlsFiles]) -> None:
    got: dict[str, Any] = {}

    async def record(conn: Conn) -> None:
        await conn.send(encode_frame(Kind.RECORD, b"", KEY))

    async def body(link: PrimaryLink) -> None:
        seq = await _write_and_barrier(link, 0)
        got["inline"] = link.collect_acks(seq, 2.0)
        got["lost"], got["rejected"] = link.lost_reason, dict(link.rejected)

    _pair(site, _rogue(record), body)
    assert got["inline"] is False
    assert got["lost"] == "unexpected frame RECORD"
    assert got["rejected"] == {"unexpected_record": 1}


def test_the_end_of_the_stream_read_inline_fails_the_link(site: dict[str, TlsFiles]) -> None:
    got: dict[str, Any] = {}

    async def close(conn: Conn) -> None:
        await conn.aclose()

    async def body(link: PrimaryLink) -> None:
        seq = await _write_and_barrier(link, 0)
        got["inline"] = link.collect_acks(seq, 2.0)
        got["lost"] = link.lost_reason

    _pair(site, _rogue(close), body)
    assert got["inline"] is False
    assert got["lost"] is not None and got["lost"].startswith("connection closed")


def test_without_direct_tls_nothing_is_collected_inline() -> None:
    """Memory streams (no socket to read from): the barrier parks as before."""

    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        link = PrimaryLink(Conn(a, KEY, "node2"), timeout=3)
        seq = link.submit(Record(0, Op.FSYNC, b"f"), flushed=True)
        assert link.collect_acks(seq, 0.05) is False
        assert link.lost_reason is None
        await b.aclose()

    trio.run(main)
