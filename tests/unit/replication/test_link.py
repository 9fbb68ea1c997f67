"""TLS link on loopback: ordered records, durable acks, refusals, garbage, timeout."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ha_runtime.replication import journal as J
from ha_runtime.replication.journal import Kind, Op, Record, derive_key, encode_frame
from ha_runtime.replication.link.framing import Conn, LinkLost
from ha_runtime.replication.link.primary import COALESCE_S, PrimaryLink
from ha_runtime.replication.link.secondary import HEAVY_RECORD_BYTES, SecondarySession
from ha_runtime.replication.link.tls import TlsFiles, client_context, connect
from ha_runtime.replication.secondary.applier import Applier
from tests.linkpair import connect_primary, serve_secondary
from tests.sitefactory import free_tcp_port

KEY = derive_key(b"s" * 48)


async def _connect(port: int, tls: TlsFiles) -> Conn:
    """The primary's end: connect to the secondary listening on loopback."""
    return await connect_primary(tls, KEY, port)


async def _listen(
    n: trio.Nursery, port: int, tls: TlsFiles, handler: Callable[[Conn], Awaitable[None]]
) -> None:
    """The secondary's end: serve ``handler`` on loopback, for the primary node1."""
    await serve_secondary(n, tls, KEY, port, handler)


async def _no_control(obj: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    return {"echo": obj.get("op")}, body


def _secondary(
    tmp: Path, tls: TlsFiles, port: int, refused: list[str], key: bytes = KEY, *,
    checkpoint_s: float = 1.0, apply: Callable[[Applier, Record], None] | None = None,
):  # fmt: skip
    applier = Applier(tmp / "second")
    apply_one = applier.apply if apply is None else partial(apply, applier)

    async def barrier() -> int:
        applier.barrier()
        return applier.applied_seq

    async def handler(conn: Conn) -> None:
        await SecondarySession(
            conn, apply_one, barrier, _no_control, on_rejected=refused.append,
            checkpoint_s=checkpoint_s,
        ).run()  # fmt: skip

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async def started(ls: Any = None) -> None:
            return None

        async with trio.open_nursery() as n:
            await serve_secondary(n, tls, key, port, handler, on_refused=refused.append)
            task_status.started()

    return applier, run


def test_records_in_order_with_durable_ack(tmp_path: Path, site: dict[str, TlsFiles]) -> None:
    port = free_tcp_port()
    refused: list[str] = []
    _applier, run_secondary = _secondary(tmp_path, site["node2"], port, refused)

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(run_secondary)
            conn = await connect(
                addresses=[("127.0.0.9", 1), ("127.0.0.1", port)],  # first one is down
                peer="node2", ctx=client_context(site["node1"]), key=KEY, timeout=1,
            )  # fmt: skip
            link = PrimaryLink(conn, timeout=3)
            n.start_soon(link.run)
            link.submit(Record(0, Op.CREATE, b"f", mode=0o100644))
            for i in range(100):
                link.submit(Record(0, Op.WRITE, b"f", offset=i, data=b"%d" % (i % 10)))
            seq = link.submit(Record(0, Op.FSYNC, b"f"))
            await link.wait_acked(seq)
            assert link.durable_seq >= seq and link.unacked() == []
            reply, body = await link.request({"op": "x"}, b"body")
            assert reply["echo"] == "x" and body == b"body"
            n.cancel_scope.cancel()

    trio.run(main)
    assert (tmp_path / "second/f").read_bytes() == b"".join(b"%d" % (i % 10) for i in range(100))
    assert refused == []


def test_the_handshaken_link_bypasses_sslstreams_send_and_receive(
    tmp_path: Path, site: dict[str, TlsFiles], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TCP, both ends send and receive through the TLS objects directly
    (link/direct.py): records, a 1 MiB write, a barrier and a control request go through
    with SSLStream's send_all and receive_some made to fail. Its handshake and close stay."""
    port = free_tcp_port()
    refused: list[str] = []
    _applier, run_secondary = _secondary(tmp_path, site["node2"], port, refused)
    mib = bytes(range(256)) * 4096

    async def refused_here(self: Any, *args: Any) -> None:
        raise AssertionError("SSLStream used after the handshake")

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(run_secondary)
            conn = await _connect(port, site["node1"])
            monkeypatch.setattr(trio.SSLStream, "send_all", refused_here)
            monkeypatch.setattr(trio.SSLStream, "receive_some", refused_here)
            link = PrimaryLink(conn, timeout=3)
            n.start_soon(link.run)
            link.submit(Record(0, Op.CREATE, b"f", mode=0o100644))
            link.submit(Record(0, Op.WRITE, b"f", offset=0, data=mib))
            link.submit(Record(0, Op.WRITE, b"f", offset=len(mib), data=b"tail"))
            await link.wait_acked(link.submit(Record(0, Op.FSYNC, b"f")))
            reply, body = await link.request({"op": "x"}, b"body")
            assert reply["echo"] == "x" and body == b"body"
            assert link.lost_reason is None
            n.cancel_scope.cancel()

    trio.run(main)
    assert (tmp_path / "second/f").read_bytes() == mib + b"tail"
    assert refused == []


def test_a_closed_links_descriptor_is_never_written_even_once_reused(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    """The direct path works on the socket's descriptor number. Once trio closed the
    socket, that number may name the next file opened: a send must refuse, not write into
    it; a receive ends."""
    port = free_tcp_port()

    async def main() -> None:
        async def idle(conn: Conn) -> None:
            await trio.sleep_forever()

        async with trio.open_nursery() as n:
            await _listen(n, port, site["node2"], idle)
            conn = await _connect(port, site["node1"])
            tcp = conn.stream.transport_stream.tcp  # type: ignore[attr-defined]
            number = tcp.socket.fileno()
            tcp.socket.close()
            victim = os.open(tmp_path / "victim", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                assert victim == number  # the lowest free number: the socket's
                with pytest.raises(trio.ClosedResourceError):
                    await conn.send(encode_frame(Kind.PING, b"", KEY))
                assert await conn.recv() is None
                assert os.fstat(victim).st_size == 0
            finally:
                os.close(victim)
            n.cancel_scope.cancel()

    trio.run(main)


def test_large_writes_are_acknowledged_on_receipt_without_a_barrier(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    """A stream of 1 MiB writes frees the primary's send queue as it arrives (acked by count
    alone, it waited for the secondary's next checkpoint with the queue full)."""
    port = free_tcp_port()
    refused: list[str] = []
    _applier, run_secondary = _secondary(tmp_path, site["node2"], port, refused, checkpoint_s=3600)
    mib = bytes(range(256)) * 4096

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(run_secondary)
            conn = await _connect(port, site["node1"])
            # keepalives (every timeout/4) are answered with an ack: none within the test
            link = PrimaryLink(conn, timeout=80, max_inflight=6 << 20)
            n.start_soon(link.run)
            link.submit(Record(0, Op.CREATE, b"f", mode=0o100644))
            with trio.fail_after(15):
                for i in range(16):
                    await link.room()
                    link.submit(Record(0, Op.WRITE, b"f", offset=i << 20, data=mib))
                while link.received_seq < 13:
                    await link._wait_change()
            assert link.durable_seq == 0  # no barrier was asked for, none ran
            n.cancel_scope.cancel()

    trio.run(main)
    assert refused == []
    assert (tmp_path / "second/f").stat().st_size >= 12 << 20


def test_other_site_certificate_and_garbage_are_refused(
    tmp_path: Path, site: dict[str, TlsFiles], other_site: dict[str, TlsFiles]
) -> None:
    port = free_tcp_port()
    refused: list[str] = []
    _, run_secondary = _secondary(tmp_path, site["node2"], port, refused)

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(run_secondary)
            client_refused: list[str] = []
            with pytest.raises(LinkLost):
                await connect(
                    addresses=[("127.0.0.1", port)], peer="node2",
                    ctx=client_context(other_site["node1"]), key=KEY, timeout=2,
                    on_refused=client_refused.append,
                )  # fmt: skip
            assert client_refused  # and the server logged it too
            # the right site, the wrong node name (node2 pretending to be the primary)
            with pytest.raises((LinkLost, trio.BrokenResourceError)):
                c = await connect(
                    addresses=[("127.0.0.1", port)], peer="node2",
                    ctx=client_context(site["node2"]), key=KEY, timeout=2,
                )  # fmt: skip
                await c.send(b"x")
                assert await c.recv() is None
                raise LinkLost("closed")
            # a genuine peer sending garbage: dropped at the first frame, nothing applied
            c = await connect_primary(site["node1"], KEY, port, timeout=2)
            await c.send(b"GET / HTTP/1.0\r\n\r\n" * 10)
            assert await c.recv() is None
            await trio.sleep(0.2)
            n.cancel_scope.cancel()

    trio.run(main)
    assert len(refused) >= 3
    assert any("bad_magic" in r for r in refused)
    assert any("peer refused" in r for r in refused)
    assert not (tmp_path / "second").exists() or list((tmp_path / "second").iterdir()) == []


def test_silent_peer_times_out(site: dict[str, TlsFiles]) -> None:
    port = free_tcp_port()

    async def main() -> None:
        async def black_hole(conn: Conn) -> None:
            await trio.sleep_forever()

        async with trio.open_nursery() as n:
            await _listen(n, port, site["node2"], black_hole)
            conn = await _connect(port, site["node1"])
            link = PrimaryLink(conn, timeout=0.5)
            n.start_soon(link.run)
            seq = link.submit(Record(0, Op.FSYNC, b""))
            t0 = trio.current_time()
            with pytest.raises(LinkLost):
                await link.wait_acked(seq)
            assert trio.current_time() - t0 < 1.0
            assert [r.seq for r in link.unacked()] == [seq]
            n.cancel_scope.cancel()

    trio.run(main)


def test_a_barrier_fails_the_link_at_its_deadline_while_the_peer_still_answers(
    site: dict[str, TlsFiles],
) -> None:
    """A secondary whose disk hangs still answers keepalives with its receipt: the link
    is alive, only the durable acknowledgement is missing. The barrier waiting for it must
    fail the link after the link's timeout, also when an earlier barrier was acknowledged
    in time (one deadline task watches them all, oldest first)."""
    port = free_tcp_port()

    async def main() -> None:
        async def disk_hangs_after_first_barrier(conn: Conn) -> None:
            received = durable = 0
            while (frames := await conn.recv_batch()) is not None:
                for f in frames:
                    if f.kind == Kind.RECORD:
                        received = J.decode_record(f.payload).seq
                        durable = received if durable == 0 else durable
                        await conn.send(J.encode_ack(received, durable, KEY))
                    elif f.kind == Kind.PING:
                        await conn.send(J.encode_ack(received, durable, KEY))
                        await conn.send(encode_frame(Kind.PONG, b"", KEY))

        async with trio.open_nursery() as n:
            await _listen(n, port, site["node2"], disk_hangs_after_first_barrier)
            link = PrimaryLink(await _connect(port, site["node1"]), timeout=0.6)
            n.start_soon(link.run)
            await link.wait_acked(link.submit(Record(0, Op.FSYNC, b"")))  # in time
            await trio.sleep(0.4)  # the first barrier's deadline is near: not the second's
            seq = link.submit(Record(0, Op.FSYNC, b""))
            t0 = trio.current_time()
            with trio.fail_after(5), pytest.raises(LinkLost, match="no acknowledgement"):
                await link.wait_acked(seq)
            assert 0.55 < trio.current_time() - t0 < 1.2
            assert link.received_seq == seq and link.durable_seq == seq - 1
            n.cancel_scope.cancel()

    trio.run(main)


def test_room_waits_for_a_slow_secondary_that_acks_and_gives_up_on_a_silent_one() -> None:
    link = PrimaryLink(conn=None, timeout=0.2, max_inflight=10)  # type: ignore[arg-type]

    async def acks(every: float, times: int) -> None:
        for _ in range(times):
            await trio.sleep(every)
            link._notify()  # an ack that frees nothing yet: progress all the same
        link._inflight_bytes = 0
        link._notify()

    async def main() -> None:
        link._inflight_bytes = 100
        async with trio.open_nursery() as n:
            n.start_soon(acks, 0.05, 12)  # 0.6 s in all, three timeouts' worth
            await link.room()  # no TooSlowError: acks kept coming
        link._inflight_bytes = 100
        with pytest.raises(trio.TooSlowError):
            await link.room()

    trio.run(main)


def _slow_large_writes(applier: Applier, rec: Record) -> None:
    """A secondary whose disk takes 2 s per large write (a resync piece on a busy disk)."""
    if len(rec.data) >= HEAVY_RECORD_BYTES:
        time.sleep(2.0)
        if rec.offset == 1 << 30:
            raise OSError(28, "No space left on device")
    applier.apply(rec)


def test_a_slow_large_record_keeps_the_link_alive_and_its_error_still_ends_it(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    """While a large record is applied (in a worker thread), keepalives are answered: a
    link with a 1 s timeout survives a 2 s apply, and the record is acknowledged when done.
    An error applying one is still reported to the primary, which drops the link."""
    port = free_tcp_port()
    refused: list[str] = []
    _applier, run_secondary = _secondary(
        tmp_path, site["node2"], port, refused, apply=_slow_large_writes
    )
    big = b"x" * HEAVY_RECORD_BYTES
    lost: list[str | None] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(run_secondary)
            conn = await _connect(port, site["node1"])
            link = PrimaryLink(conn, timeout=1)
            n.start_soon(link.run)
            link.submit(Record(0, Op.CREATE, b"f", mode=0o100644))
            seq = link.submit(Record(0, Op.WRITE, b"f", offset=0, data=big))
            link.submit(Record(0, Op.WRITE, b"f", offset=len(big), data=b"tail"))
            with trio.fail_after(10):
                await link.wait_progress(lambda: link.received_seq >= seq)
            assert link.lost_reason is None
            link.submit(Record(0, Op.WRITE, b"f", offset=1 << 30, data=big))
            with trio.fail_after(10):
                await link.wait_lost()
            lost.append(link.lost_reason)
            n.cancel_scope.cancel()

    trio.run(main)
    assert lost and "secondary error" in str(lost[0]) and "No space" in str(lost[0])
    assert (tmp_path / "second/f").read_bytes() == big + b"tail"


def test_a_session_broken_mid_send_ends_alone_and_the_listener_serves_the_next(
    site: dict[str, TlsFiles],
) -> None:
    """A primary that vanishes while the secondary sends (its ack hits a reset) ends that
    session only; before, the error took the whole replication process down."""
    port = free_tcp_port()
    sessions: list[str] = []

    async def handler(conn: Conn) -> None:
        sessions.append(conn.peer)
        if len(sessions) == 1:
            raise trio.BrokenResourceError  # what a send to a reset peer raises
        await conn.send(encode_frame(Kind.PONG, b"", KEY))

    async def main() -> None:
        async with trio.open_nursery() as n:
            await _listen(n, port, site["node2"], handler)
            for expect_pong in (False, True):
                conn = await _connect(port, site["node1"])
                with trio.fail_after(5):
                    fr = await conn.recv()
                assert (fr is not None and fr.kind == Kind.PONG) is expect_pong
                await conn.aclose()
            n.cancel_scope.cancel()

    trio.run(main)
    assert sessions == ["node1", "node1"]


def test_a_long_queue_is_sent_in_bounded_batches_in_order() -> None:
    """A primary far ahead of its secondary used to join its whole queue (tens of MiB) into
    one send: one huge allocation, copy and TLS write. Now about SEND_BATCH_BYTES per send,
    a large frame alone (not copied), small ones together, order kept across flush()."""
    sizes: list[int] = []
    got: list[Record] = []

    async def main() -> None:
        peer, ours = trio.testing.memory_stream_pair()
        conn = Conn(ours, KEY, "node2")
        real_send = conn.send

        async def send(data: bytes) -> None:
            sizes.append(len(data))
            await real_send(data)

        conn.send = send  # type: ignore[method-assign]
        link = PrimaryLink(conn, timeout=5)
        link.untagged = True
        big = b"x" * (1 << 20)
        for i in range(6):
            link.submit(Record(0, Op.WRITE, b"f", offset=i << 20, data=big))
        for i in range(300):
            link.submit(Record(0, Op.WRITE, b"g", offset=i, data=b"y"))
        await link.flush()  # from the calling task, as a barrier does, while the queue is long
        dec = J.FrameDecoder(KEY, untagged=True)
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(link._sender)
                link._urgent.set()
                while len(got) < 306:
                    got.extend(
                        J.decode_record(f.payload) for f in dec.feed(await peer.receive_some())
                    )
                n.cancel_scope.cancel()

    trio.run(main)
    assert [r.seq for r in got] == list(range(1, 307))
    frame = (1 << 20) + 200
    assert len(sizes) >= 7 and max(sizes) <= frame, sizes  # never two 1 MiB frames in one send
    assert sum(sizes[6:]) == sum(sizes) - sum(sizes[:6]) and len(sizes[6:]) <= 2, sizes


def test_a_write_waits_for_its_barrier_and_travels_with_it_in_one_send() -> None:
    """A 4 KiB write then fdatasync used to cost two sends (the sender shipped the write at
    once, the barrier its FSYNC): two TLS records, two wakes of the secondary. A record
    nothing waits for now waits COALESCE_S for company; a barrier, a request or a keepalive
    ships at once; and a lone write still leaves after COALESCE_S, not later."""
    sends: list[tuple[float, int]] = []

    async def main() -> None:
        peer, ours = trio.testing.memory_stream_pair()
        conn = Conn(ours, KEY, "node2")
        real_send = conn.send

        async def send(data: bytes) -> None:
            sends.append((trio.current_time(), len(data)))
            await real_send(data)

        conn.send = send  # type: ignore[method-assign]
        link = PrimaryLink(conn, timeout=5)
        link.untagged = True
        dec = J.FrameDecoder(KEY, untagged=True)
        async with trio.open_nursery() as n:
            n.start_soon(link._sender)
            t0 = trio.current_time()
            link.submit(Record(0, Op.WRITE, b"db", offset=0, data=b"x" * 4096))
            await trio.sleep(COALESCE_S / 5)  # the application's fdatasync arrives
            link.submit(Record(0, Op.FSYNC, b"db", flags=1))
            await trio.sleep(COALESCE_S / 10)
            assert len(sends) == 1, sends  # both frames, shipped by the barrier's wake
            assert sends[0][0] - t0 < COALESCE_S
            frames = dec.feed(await peer.receive_some())
            assert [J.decode_record(f.payload).op for f in frames] == [Op.WRITE, Op.FSYNC]

            t1 = trio.current_time()
            link.submit(Record(0, Op.WRITE, b"log", offset=0, data=b"y"))  # alone
            await trio.sleep(COALESCE_S * 4)
            assert len(sends) == 2, sends
            assert 0 < sends[1][0] - t1 <= COALESCE_S  # held for company, not longer

            t2 = trio.current_time()
            link.ping()  # a keepalive is waited for: at once
            await trio.sleep(COALESCE_S / 10)
            assert len(sends) == 3 and sends[2][0] - t2 < COALESCE_S / 10, sends

            # A barrier sends from its own task (flushed): the write and its FSYNC leave in
            # that one send, and the sender has nothing left to wake for.
            link.submit(Record(0, Op.WRITE, b"db", offset=4096, data=b"z" * 4096))
            await trio.sleep(COALESCE_S / 5)
            link.submit(Record(0, Op.FSYNC, b"db", flags=1), flushed=True)
            await link.flush()
            assert len(sends) == 4, sends
            await trio.sleep(COALESCE_S * 4)
            assert len(sends) == 4, sends
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_frames_of_one_receive_come_out_together_and_the_end_after_them() -> None:
    """The secondary's reader hands on what one receive decoded as one item (a write and
    its fsync arrive in one TLS record), and a stream cut after them ends with None."""

    async def main() -> None:
        peer, ours = trio.testing.memory_stream_pair()
        conn = Conn(ours, KEY, "node1")
        conn.accept_untagged()
        frames = [
            J.record_frame(Record(1, Op.WRITE, b"db", offset=0, data=b"x" * 4096), KEY, tag=False),
            J.record_frame(Record(2, Op.FSYNC, b"db", flags=1), KEY, tag=False),
            encode_frame(Kind.PING, b"", KEY),
        ]
        await peer.send_all(b"".join(frames))
        batch = await conn.recv_batch()
        assert batch is not None
        assert [f.kind for f in batch] == [Kind.RECORD, Kind.RECORD, Kind.PING]
        assert [J.decode_record(f.payload).seq for f in batch[:2]] == [1, 2]
        await peer.send_all(frames[0][:10])  # half a frame, then the end
        await peer.aclose()
        assert await conn.recv_batch() is None

    trio.run(main)
