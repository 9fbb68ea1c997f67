"""``PrimaryLink``: the primary's end of the link. It numbers records, sends them in order,
tracks acks and the window of records not yet durable on the secondary, and declares the
link lost when an awaited ack or a keepalive answer is later than ``timeout``.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ha_runtime.replication.journal import (
    Frame,
    Kind,
    Op,
    Record,
    encode_frame,
    record_frame,
)
from ha_runtime.replication.link.framing import Conn, LinkLost, decode_control, encode_control

log = logging.getLogger("hapair.replication")


def _meta(rec: Record) -> Record:
    """What the window keeps of a record: enough to mark it dirty, not its data."""
    if rec.op == Op.WRITE:
        return Record(rec.seq, Op.WRITE, rec.path, offset=rec.offset, length=len(rec.data))
    if rec.op in (Op.DELTA, Op.REPLACE):
        return Record(rec.seq, Op.TRUNCATE, rec.path, offset=0)
    return Record(rec.seq, rec.op, rec.path, path2=rec.path2, offset=rec.offset, length=rec.length)


# One send joins the queued frames up to this size: a queue of tens of MiB (the primary ahead
# of the secondary) joined at once was tens of MiB allocated, copied and encrypted in one go.
SEND_BATCH_BYTES = 1 << 20
# A record nothing waits for (a write, a rename: not a barrier, a request or a keepalive)
# waits this long for company before the sender ships it. The fsync that usually follows a
# write then travels with it: one TLS record, one send, one wake of the secondary instead of
# two of each (a fifth of the replicas' CPU per 4 KiB write + fdatasync). Shipping a record
# no one waits for half a millisecond later delays no acknowledgement.
COALESCE_S = 0.0005


@dataclass
class LinkStats:
    last_seq: int = 0
    received_seq: int = 0
    durable_seq: int = 0
    inflight_bytes: int = 0
    window: int = 0


@dataclass
class PrimaryLink:
    """Ordered, acknowledged record stream to the secondary over one Conn."""

    conn: Conn
    timeout: float = 3.0
    durable: bool = True
    max_inflight: int = 64 << 20
    seq: int = 0
    received_seq: int = 0
    durable_seq: int = 0
    lost_reason: str | None = None
    window: deque[Record] = field(default_factory=deque)
    _out: list[bytes] = field(default_factory=list)
    _out_bytes: int = 0
    _inflight: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, size)
    _inflight_bytes: int = 0
    # Set when something queued is waited for (a request, a keepalive, a full batch, a
    # barrier nobody flushes): the sender ships at once.
    _urgent: trio.Event = field(default_factory=trio.Event)
    # The sender's wait while nothing is urgent. A record nothing waits for sets its deadline
    # (COALESCE_S from now) instead of waking it; a barrier's flush that took everything
    # clears it again. A write then its fsync: the sender never runs at all.
    _idle: trio.CancelScope | None = None
    _ack_changed: trio.Event = field(default_factory=trio.Event)
    _lost: trio.Event = field(default_factory=trio.Event)
    # Acknowledgements waited for with the link's timeout, in the order they began:
    # (seq, deadline). One task (``_watch_deadlines``) sleeps until the oldest deadline,
    # instead of a cancel scope per barrier: entering and leaving trio's fail_after costs
    # 30-40 µs, on a 4 KiB write + fdatasync that the primary spends about 1.2 ms of CPU on.
    _deadlines: deque[tuple[int, float]] = field(default_factory=deque)
    _deadline_added: trio.Event = field(default_factory=trio.Event)
    _replies: dict[int, tuple[dict[str, Any], bytes]] = field(default_factory=dict)
    _req: int = 0
    _last_heard: float = field(default_factory=time.monotonic)
    # Frames from the secondary refused (each drops the link), by reason, as on the secondary.
    rejected: Counter[str] = field(default_factory=Counter)
    on_rejected: Callable[[str], None] | None = None
    # Send version 3 frames (no tag): set once the secondary said it reads them (HELLO).
    untagged: bool = False

    def submit(self, rec: Record, *, flushed: bool = False) -> int:
        """Queue a record (assigning its sequence number). Never blocks, never reorders.
        ``flushed``: the caller sends the queue itself at once (``flush``), as a barrier does:
        the sender need not wake for it."""
        if self.lost_reason:
            raise LinkLost(self.lost_reason)
        self.seq += 1
        r = Record(
            self.seq,
            rec.op,
            rec.path,
            rec.path2,
            rec.offset,
            rec.length,
            rec.mode,
            rec.uid,
            rec.gid,
            rec.rdev,
            rec.atime_ns,
            rec.mtime_ns,
            rec.flags,
            rec.name,
            rec.data,
        )
        frame = record_frame(r, self.conn.key, tag=not self.untagged)
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._inflight.append((self.seq, len(frame)))
        self._inflight_bytes += len(frame)
        self.window.append(_meta(r))
        if not flushed:
            self._wake(urgent=rec.op == Op.FSYNC or self._out_bytes >= SEND_BATCH_BYTES)
        return self.seq

    def submit_control(self, obj: dict[str, Any], body: bytes = b"") -> int:
        if self.lost_reason:
            raise LinkLost(self.lost_reason)
        self._req += 1
        frame = encode_control({**obj, "id": self._req}, body, self.conn.key, tag=not self.untagged)
        self._out.append(frame)
        self._wake(urgent=True)
        return self._req

    def _wake(self, *, urgent: bool) -> None:
        if urgent:
            self._urgent.set()
        elif self._idle is not None and self._idle.deadline == math.inf:
            self._idle.deadline = trio.current_time() + COALESCE_S

    async def request(self, obj: dict[str, Any], body: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """Send a CONTROL request in stream order and wait for its reply (no timeout beyond
        the link's own liveness: replies to large requests may take long)."""
        rid = self.submit_control(obj, body)
        while rid not in self._replies:
            await self._wait_change()
        return self._replies.pop(rid)

    async def _wait_change(self) -> None:
        if self.lost_reason:
            raise LinkLost(self.lost_reason)
        ev = self._ack_changed
        await ev.wait()
        if self.lost_reason:
            raise LinkLost(self.lost_reason)

    async def room(self) -> None:
        """Backpressure: wait while too many bytes are unacknowledged."""
        await self.wait_progress(lambda: self._inflight_bytes <= self.max_inflight)

    async def wait_progress(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()``, re-checked on every acknowledgement. TooSlowError only when
        no acknowledgement at all came for a whole timeout: a busy secondary still making
        progress (a resync's large records) is not a dead one."""
        while not done():
            with trio.move_on_after(self.timeout) as cs:
                await self._wait_change()
            if cs.cancelled_caught:
                raise trio.TooSlowError

    async def wait_acked(self, seq: int, timeout: float | None = None) -> None:
        """Wait until the secondary acknowledged ``seq`` (durably in durable mode); the link
        fails when that takes longer than ``timeout`` (default: the link's, watched by
        ``run``'s deadline task; another one gets a scope of its own)."""
        if self._acked(seq):
            return
        if timeout is not None:
            try:
                with trio.fail_after(timeout):
                    while not self._acked(seq):
                        await self._wait_change()
            except trio.TooSlowError:
                self.fail(f"no acknowledgement within {timeout:g} s")
                raise LinkLost(self.lost_reason) from None
            return
        if self.lost_reason:
            raise LinkLost(self.lost_reason)
        self._deadlines.append((seq, trio.current_time() + self.timeout))
        self._deadline_added.set()
        while not self._acked(seq):
            await self._wait_change()

    def _acked(self, seq: int) -> bool:
        return (self.durable_seq if self.durable else self.received_seq) >= seq

    async def _watch_deadlines(self) -> None:
        """Fail the link when the oldest acknowledgement waited for (with the link's
        timeout) is not in by its deadline. The deadlines are in the order they began, so
        the oldest is the nearest: one sleep covers every barrier behind it."""
        while True:
            while self._deadlines and self._acked(self._deadlines[0][0]):
                self._deadlines.popleft()
            if not self._deadlines:
                self._deadline_added = trio.Event()
                await self._deadline_added.wait()
                continue
            seq, deadline = self._deadlines[0]
            await trio.sleep_until(deadline)
            if not self._acked(seq):
                self.fail(f"no acknowledgement within {self.timeout:g} s")
                return

    async def wait_lost(self) -> None:
        """Return once the link is lost (``lost_reason`` says why)."""
        await self._lost.wait()

    def fail(self, reason: str) -> None:
        if not self.lost_reason:
            self.lost_reason = reason
            log.warning("replication link to %s lost: %s", self.conn.peer, reason)
            self._lost.set()
            self._ack_changed.set()

    def ping(self) -> None:
        """Queue a keepalive now. The secondary answers it, with its receipt ack, once it has
        handled everything queued before it: a resync paces itself with these."""
        if self.lost_reason:
            raise LinkLost(self.lost_reason)
        self._out.append(self._ping_frame())
        self._wake(urgent=True)

    def _ping_frame(self) -> bytes:
        return encode_frame(Kind.PING, b"", self.conn.key, tag=not self.untagged)

    def unacked(self) -> list[Record]:
        """Records the secondary may not have made durable (to mark dirty when lost)."""
        return [r for r in self.window if r.seq > self.durable_seq]

    def stats(self) -> LinkStats:
        return LinkStats(
            self.seq, self.received_seq, self.durable_seq, self._inflight_bytes, len(self.window)
        )

    async def run(self) -> None:
        """Sender, receiver and keepalive; returns (never raises) when the link is lost."""
        async with trio.open_nursery() as n:
            n.start_soon(self._sender)
            n.start_soon(self._receiver)
            n.start_soon(self._keepalive)
            n.start_soon(self._watch_deadlines)
            await self._lost.wait()
            n.cancel_scope.cancel()
        await self.conn.aclose()

    async def _sender(self) -> None:
        while True:
            with trio.CancelScope() as self._idle:
                if self._out:  # queued while the last batch was sent: company is waited for
                    self._idle.deadline = trio.current_time() + COALESCE_S
                await self._urgent.wait()
            self._idle = None
            self._urgent = trio.Event()
            while self._out and await self._send_out():
                pass
            if self.lost_reason:
                return

    async def _send_out(self) -> bool:
        """Send what is queued, at most about SEND_BATCH_BYTES at a time (the sender loops for
        the rest); False if the link failed. Order holds between the sender and ``flush``:
        each takes its batch from the front and queues on the connection's FIFO lock at once.
        """
        n, size = 0, 0
        while n < len(self._out) and (n == 0 or size + len(self._out[n]) <= SEND_BATCH_BYTES):
            size += len(self._out[n])
            n += 1
        batch, self._out = self._out[:n], self._out[n:]
        self._out_bytes = max(0, self._out_bytes - size)
        try:
            await self.conn.send(b"".join(batch))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as e:
            self.fail(f"send failed: {e}")
            return False
        return True

    async def flush(self) -> None:
        """Send what is queued now, from the calling task (a barrier about to block)."""
        if self._out and not self.lost_reason:
            await self._send_out()
        if self._out:
            self._urgent.set()  # more than one batch: the sender goes on with it at once
        elif self._idle is not None:
            self._idle.deadline = math.inf  # nothing left for the sender to wake for

    async def _receiver(self) -> None:
        while True:
            f = await self.conn.recv()
            if f is None:
                self._closed()
                return
            if not self._take(f):
                return

    def collect_acks(self, seq: int, budget: float) -> bool:
        """Whether ``seq`` is acknowledged within ``budget`` s, read in the calling task (the
        event loop held) in place of the receiving task, each frame handled as it would: a
        barrier whose ack is on its way skips two scheduler passes (its park, the receiver's
        wake). False, nothing lost, when the budget ran out, the link failed, or the receiver
        cannot be stood in for now (``Conn.receive_now``)."""
        deadline = time.monotonic() + budget
        while not self._acked(seq):
            if self.lost_reason:
                return False
            frames = self.conn.receive_now(deadline)
            if frames is not None and not all(map(self._take, frames)):
                return False  # the first frame that failed the link ends it
            if frames is None or self.conn.failed:
                self._closed()
                return False
            if not frames:
                return False
        return True

    def _closed(self) -> None:
        """The stream ended, or a frame was rejected (``conn.failed``)."""
        if self.conn.failed:
            self._reject(self.conn.failed)
        self.fail(f"connection closed ({self.conn.failed or 'end of stream'})")

    def _take(self, f: Frame) -> bool:
        """Handle one frame from the secondary; False once it failed the link."""
        self._last_heard = time.monotonic()
        if f.kind == Kind.ACK:
            a = f.ack()
            if a is None:
                self._reject("malformed_ack")
                self.fail("malformed ack")
                return False
            self._on_ack(*a)
        elif f.kind == Kind.CONTROL:
            c = decode_control(f)
            if c is None or not isinstance(c[0].get("id"), int):
                self._reject("malformed_control")
                self.fail("malformed control reply")
                return False
            self._replies[c[0]["id"]] = c
            self._notify()
        elif f.kind == Kind.ERROR:
            obj = f.json() or {}
            self.fail(f"secondary error: {obj.get('error', '?')}")
            return False
        elif f.kind != Kind.PONG:
            self._reject(f"unexpected_{f.kind.name.lower()}")
            self.fail(f"unexpected frame {f.kind.name}")
            return False
        return True

    def _reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        if self.on_rejected:
            self.on_rejected(reason)

    def _notify(self) -> None:
        ev, self._ack_changed = self._ack_changed, trio.Event()
        ev.set()

    def _on_ack(self, received: int, durable: int) -> None:
        self.received_seq = max(self.received_seq, min(received, self.seq))
        self.durable_seq = max(self.durable_seq, min(durable, self.received_seq))
        while self._inflight and self._inflight[0][0] <= self.received_seq:
            self._inflight_bytes -= self._inflight.popleft()[1]
        while self.window and self.window[0].seq <= self.durable_seq:
            self.window.popleft()
        self._notify()

    async def _keepalive(self) -> None:
        period = max(0.05, self.timeout / 4)
        while True:
            await trio.sleep(period)
            self._out.append(self._ping_frame())
            self._wake(urgent=True)
            if time.monotonic() - self._last_heard > self.timeout:
                self.fail(f"peer silent for {self.timeout:g} s")
                return


def backoff(attempt: int) -> float:
    return min(2.0, 0.1 * math.pow(2, attempt))
