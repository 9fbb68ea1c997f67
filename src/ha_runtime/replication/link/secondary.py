"""``SecondarySession``: the secondary's end of the link (its wire part): frames in order,
records handed to the applier, control requests to the server's handler, acknowledgements
and keepalive answers back. What the records and requests mean is ``secondary``'s.

Long because: one session, two readers (trio's task, or the lane's thread of
``link.lane``) sharing its order and acknowledgement state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from ha_runtime.replication.journal import (
    Frame,
    Kind,
    Op,
    Record,
    RecordError,
    decode_record,
    encode_ack,
    encode_frame,
)
from ha_runtime.replication.link.framing import LINK_ERRORS, Conn, decode_control, encode_control
from ha_runtime.replication.link.lane import BlockingTls, open_lane

log = logging.getLogger("hapair.replication")

T = TypeVar("T")

# Receipt acks free the primary's send queue (max_inflight, 64 MiB by default): acked by
# count alone, a stream of 1 MiB writes filled it and stalled until the next checkpoint.
ACK_EVERY_RECORDS = 256
ACK_EVERY_BYTES = 4 << 20
# Records at least this large are applied in a worker thread while keepalives are answered
# (and the next frames decrypted meanwhile).
HEAVY_RECORD_BYTES = 256 << 10


# What the reader hands the applying task: the frames of one receive, or None at the end.
Batch = list[Frame] | None

ControlHandler = Callable[[dict[str, Any], bytes], Awaitable[tuple[dict[str, Any], bytes]]]


@dataclass
class SecondarySession:
    """Apply the primary's stream in order and acknowledge.

    ``apply`` applies one record (an OSError is reported to the primary as an ERROR frame,
    then the connection is closed); applying a FSYNC record makes everything applied so far
    durable. ``barrier`` does the same outside the stream and returns the durable sequence
    number. In ``durable`` mode a FSYNC record is applied then acked, otherwise acked at
    once without being applied. Either way a checkpoint (barrier) runs every
    ``checkpoint_s`` while records flow, so the primary can trim its window."""

    conn: Conn
    apply: Callable[[Record], None]
    barrier: Callable[[], Awaitable[int]]
    control: ControlHandler
    durable: bool = True
    checkpoint_s: float = 1.0
    on_rejected: Callable[[str], None] | None = None
    # The primary pings every timeout/4: a peer silent this long is gone, or stuck half-way
    # through a frame whose length lied; drop it so a new connection can take its place.
    idle_timeout_s: float = 30.0
    received: int = 0
    durable_seq: int = 0
    _last_ckpt: float = field(default_factory=time.monotonic)
    _last_frame: float = field(default_factory=time.monotonic)
    _unacked: int = 0
    _unacked_bytes: int = 0
    # Frames received while a control request ran, handled next, in order.
    _held: deque[Frame | None] = field(default_factory=deque)
    # The blocking lane (``link.lane``) when the link is TLS over a socket, unless off: the
    # reader then runs in a worker thread and handles the steady stream itself.
    use_lane: bool = True
    _lane: BlockingTls | None = None
    # The lane handles a frame itself only while the session task waits for frames with
    # nothing held and every batch handed over taken: then it is the next frame in order.
    _waiting: bool = False
    _handed: int = 0  # batches the reader handed over
    _taken: int = 0  # ... and the session task took
    _worker: ThreadPoolExecutor | None = None  # the lane's heavy applies
    lane_frames: int = 0  # frames the lane's thread handled itself

    async def run(self) -> None:
        send_ch, recv_ch = trio.open_memory_channel[Batch](64)
        self._lane = open_lane(self.conn) if self.use_lane else None
        lane = self._lane

        async def reader() -> None:
            # A separate task: cancelling a TLS receive half-way is not safe, a channel is.
            # One item per receive: the frames of one TLS read cross together.
            while True:
                if lane is None:
                    batch = await self.conn.recv_batch()
                else:
                    batch = await trio.to_thread.run_sync(self._lane_run, lane)
                await send_ch.send(batch)
                if batch is None:
                    return

        if lane is not None:
            self.conn.send_through(lane.send)
        try:
            await self._run(reader, recv_ch)
        finally:
            if lane is not None:
                self.conn.send_through(None)
                lane.close()
            if self._worker is not None:
                self._worker.shutdown()

    async def _run(
        self, reader: Callable[[], Awaitable[None]], recv_ch: trio.MemoryReceiveChannel[Batch]
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            try:
                await self._loop(recv_ch)
            except Exception as e:
                if _only(e, LINK_ERRORS):
                    raise  # the connection broke: the listener logs it
                # Anything else (a control handler's RecursionError, a checkpoint's EIO) is
                # a link failure: counted, told to the primary, the session ends.
                log.exception("replication: session with %s failed", self.conn.peer, exc_info=e)
                self._reject("session_error")
                await self._send_error(f"session failed: {e!r}")
            finally:
                if self._lane is not None:
                    self._lane.stop()  # the reader's thread returns; the nursery waits for it
                nursery.cancel_scope.cancel()

    async def _send_error(self, msg: str) -> None:
        """Best effort: the primary drops the link on it (it would on the close anyway)."""
        with trio.move_on_after(1), contextlib.suppress(*LINK_ERRORS, OSError):
            await self.conn.send(
                encode_frame(Kind.ERROR, json.dumps({"error": msg}).encode(), self.conn.key)
            )

    def _reject(self, reason: str) -> None:
        log.warning("replication: dropping connection from %s: %s", self.conn.peer, reason)
        if self.on_rejected:
            self.on_rejected(reason)

    async def _ack(self, extra: bytes = b"") -> None:
        await self.conn.send(self._ack_bytes(extra))

    def _ack_bytes(self, extra: bytes = b"") -> bytes:
        self._unacked = 0
        self._unacked_bytes = 0
        return encode_ack(self.received, self.durable_seq, self.conn.key) + extra

    def _pong(self) -> bytes:
        """A keepalive's answer: the acknowledgement as it stands, then the PONG."""
        return self._ack_bytes(encode_frame(Kind.PONG, b"", self.conn.key))

    async def _next(self, frames: trio.MemoryReceiveChannel[Batch]) -> list[Frame | None]:
        batch = await frames.receive()
        self._taken += 1
        return _frames_of(batch)

    def _lane_run(self, lane: BlockingTls) -> Batch:
        """The reader, in the lane's worker thread: receive, and while the session task
        may not act (``_waiting``), handle records and keepalives here. Returns what the
        session task handles: frames, [] for a quiet ``checkpoint_s`` or a checkpoint
        due (its timers run there), None at the end."""
        batch = self._lane_batch(lane)
        self._handed += 1
        return batch

    def _lane_batch(self, lane: BlockingTls) -> Batch:
        pending: deque[Frame] = deque()
        quiet_until = time.monotonic() + self.checkpoint_s
        while True:
            if not pending:
                if self._lane_owns() and self._late():
                    return []
                batch = lane.receive(quiet_until - time.monotonic())
                if batch == [] and time.monotonic() < quiet_until and not lane.stopped:
                    continue  # a late nudge of an apply already done
                if not batch:
                    return batch
                quiet_until = time.monotonic() + self.checkpoint_s
                self._last_frame = time.monotonic()
                pending.extend(batch)
            while pending:
                if not (self._lane_owns() and self._inline(pending[0], lane, pending)):
                    return list(pending)
                pending.popleft()

    def _lane_owns(self) -> bool:
        return self._waiting and self._handed == self._taken and not self._held

    def _late(self) -> bool:
        late = time.monotonic() - self._last_ckpt > self.checkpoint_s
        return late and self.durable_seq < self.received

    def _inline(self, f: Frame, lane: BlockingTls, pending: deque[Frame]) -> bool:
        """Handle ``f`` in the lane's thread, or False to hand it (and ``pending`` after it)
        to the session task: a control request, anything refused (the task reports it:
        applying again is harmless, records are idempotent)."""
        if f.kind == Kind.PING:
            lane.send(self._pong())
            self.lane_frames += 1
            return True
        if f.kind != Kind.RECORD:
            return False
        try:
            rec = decode_record(f.payload)
        except RecordError:
            return False
        heavy = _heavy(rec)
        try:
            if heavy:
                self._apply_answering_keepalives(rec, lane, pending)
            out = self._apply_now(rec, f, heavy)
        except (OSError, ValueError):
            return False
        if out:
            lane.send(out)
        self.lane_frames += 1
        return True

    def _apply_answering_keepalives(
        self, rec: Record, lane: BlockingTls, pending: deque[Frame]
    ) -> None:
        """Apply a heavy record in a worker while the lane answers keepalives; the other
        frames received meanwhile join ``pending``, in order (``_answering_keepalives``)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="hapair-apply")
        done = self._worker.submit(self.apply, rec)
        done.add_done_callback(lambda _: lane.nudge())
        while not done.done():
            got = lane.receive(self.checkpoint_s)
            if got is None:
                break  # the stream ended: the apply is waited for, the end seen next
            for fr in got:
                if fr.kind == Kind.PING:
                    lane.send(self._pong())
                else:
                    pending.append(fr)
        done.result()

    def _apply_now(self, rec: Record, f: Frame, heavy: bool) -> bytes:
        """Apply ``rec`` (unless a FSYNC acknowledged on receipt) and account for it: the
        acknowledgement to send now, or b"". Raises the applier's OSError/ValueError."""
        if rec.op == Op.FSYNC and not self.durable:
            # `ack: received`: acknowledged on receipt; the periodic checkpoint syncs it.
            self.received = rec.seq
            return self._ack_bytes()
        if not heavy:
            self.apply(rec)
        self.received = rec.seq
        self._unacked += 1
        self._unacked_bytes += len(f.payload)
        if rec.op == Op.FSYNC:
            # Applying a FSYNC made everything applied durable (a thread hop for another
            # barrier here cost a millisecond on every fsync of the application).
            self.durable_seq = rec.seq
            self._last_ckpt = time.monotonic()
            return self._ack_bytes()
        if (
            heavy  # keepalives answered meanwhile carried the ack before it: say it is done
            or self._unacked >= ACK_EVERY_RECORDS
            or self._unacked_bytes >= ACK_EVERY_BYTES
        ):
            return self._ack_bytes()
        return b""

    async def _checkpoint(self) -> None:
        self.durable_seq = await self.barrier()
        self._last_ckpt = time.monotonic()

    async def _loop(self, frames: trio.MemoryReceiveChannel[Batch]) -> None:
        while True:
            timed_out = True
            f: Frame | None = None
            if not self._held and self._lane is not None:
                # No timeout here: the lane's thread hands [] over when one is due.
                self._waiting = True
                try:
                    self._held.extend(await self._next(frames))
                finally:
                    self._waiting = False
            elif not self._held:
                with trio.move_on_after(self.checkpoint_s):
                    self._held.extend(await self._next(frames))
            if self._held:
                f = self._held.popleft()
                timed_out = False
            if f is None and not timed_out:
                if self.conn.failed:
                    self._reject(self.conn.failed)
                return
            now = time.monotonic()
            if f is not None:
                self._last_frame = now
            elif now - self._last_frame > self.idle_timeout_s:
                self._reject("idle")
                return
            late = time.monotonic() - self._last_ckpt > self.checkpoint_s
            if (f is None or late) and self.durable_seq < self.received:
                if self._unacked:
                    # Free the primary's send queue first: the fsync may take a while.
                    await self._ack()
                await self._answering_keepalives(self._checkpoint, frames)
                await self._ack()
            if f is not None and not await self._handle(f, frames):
                return

    async def _answering_keepalives(
        self, work: Callable[[], Awaitable[T]], frames: trio.MemoryReceiveChannel[Batch]
    ) -> T:
        """Run ``work`` (a control request, a large record applied in a thread, a checkpoint)
        while answering the primary's keepalives; any other frame waits, in order, until it
        is done. Without this a piece of a full resync rebuilding 32 MiB, or a syncfs behind
        a resync's dirty pages, held the answers past the link's timeout and the primary
        dropped the link and started over."""
        done = False
        waiting: trio.CancelScope | None = None

        async def keepalives() -> None:
            nonlocal waiting
            while not done:
                with trio.CancelScope() as waiting:
                    batch = await self._next(frames)
                if waiting.cancelled_caught:
                    return
                # Only the wait above is ever cancelled: a TLS send cut half-way breaks the
                # stream for good (the next ack then raised BrokenResourceError). The whole
                # batch is gone through, whatever `done` says meanwhile: nothing is dropped.
                for fr in batch:
                    if fr is not None and fr.kind == Kind.PING:
                        await self.conn.send(self._pong())
                        continue
                    self._held.append(fr)
                    if fr is None:
                        return

        result: list[T] = []
        failed: list[Exception] = []
        async with trio.open_nursery() as n:
            n.start_soon(keepalives)
            try:
                result.append(await work())
            except Exception as e:  # re-raised bare below, not inside an ExceptionGroup
                failed.append(e)
            done = True
            if waiting is not None:
                waiting.cancel()
        if failed:
            raise failed[0]
        return result[0]

    async def _control(self, c: Any, frames: trio.MemoryReceiveChannel[Batch]) -> Any:
        """Run a control request (a digest or signatures of a large tree may take longer than
        the link's timeout) while answering keepalives."""

        async def work() -> tuple[dict[str, Any], bytes]:
            try:
                return await self.control(*c)
            except (OSError, ValueError) as e:
                return {"error": str(e)}, b""

        return await self._answering_keepalives(work, frames)

    async def _handle(self, f: Frame, frames: trio.MemoryReceiveChannel[Batch]) -> bool:
        if f.kind == Kind.RECORD:
            return await self._record(f, frames)
        if f.kind == Kind.PING:
            await self.conn.send(self._pong())
            return True
        if f.kind == Kind.CONTROL:
            c = decode_control(f)
            if c is None:
                self._reject("malformed_control")
                return False
            obj, body = await self._control(c, frames)
            self._last_frame = time.monotonic()  # keepalives were answered meanwhile
            self.durable_seq = max(self.durable_seq, int(obj.pop("_durable", 0)))
            await self._ack(encode_control({**obj, "id": c[0].get("id")}, body, self.conn.key))
            return True
        self._reject(f"unexpected_{f.kind.name.lower()}")
        return False

    async def _record(self, f: Frame, frames: trio.MemoryReceiveChannel[Batch]) -> bool:
        try:
            rec = decode_record(f.payload)
        except RecordError as e:
            self._reject(str(e))
            return False
        heavy = _heavy(rec)
        try:
            if heavy:
                await self._answering_keepalives(
                    lambda: trio.to_thread.run_sync(self.apply, rec), frames
                )
            out = self._apply_now(rec, f, heavy)
        except (OSError, ValueError) as e:
            # ValueError: the applier's refusal (RecordRefused, a delta out of sequence).
            log.warning("replication: cannot apply %s %r: %s", rec.op.name, rec.path, e)
            self._reject("apply_failed" if isinstance(e, OSError) else "apply_refused")
            err = json.dumps({"error": f"{rec.op.name} {rec.path!r}: {e}"}).encode()
            await self.conn.send(encode_frame(Kind.ERROR, err, self.conn.key))
            return False
        if out:
            await self.conn.send(out)
        return True


def _frames_of(batch: Batch) -> list[Frame | None]:
    """A batch's frames; the end of the stream (None) as a last item."""
    return [None] if batch is None else list(batch)


def _only(e: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """``e`` is one of ``types``, or a group of nothing else."""
    if isinstance(e, BaseExceptionGroup):
        _, rest = e.split(types)
        return rest is None
    return isinstance(e, types)


def _heavy(rec: Record) -> bool:
    """A record applied in a worker thread: a full resync's piece (rebuilds up to 32 MiB)
    or a large write. Small ones stay inline: a thread hop costs more than they do."""
    return rec.op in (Op.DELTA, Op.REPLACE) or len(rec.data) >= HEAVY_RECORD_BYTES
