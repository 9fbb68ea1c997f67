"""``SecondarySession``: the secondary's end of the link (its wire part): frames in order,
records handed to the applier, control requests to the server's handler, acknowledgements
and keepalive answers back. What the records and requests mean is ``secondary``'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
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

    async def run(self) -> None:
        send_ch, recv_ch = trio.open_memory_channel[Batch](64)

        async def reader() -> None:
            # A separate task: cancelling a TLS receive half-way is not safe, a channel is.
            # One item per receive: the frames of one TLS read cross together.
            while True:
                batch = await self.conn.recv_batch()
                await send_ch.send(batch)
                if batch is None:
                    return

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
        await self.conn.send(encode_ack(self.received, self.durable_seq, self.conn.key) + extra)
        self._unacked = 0
        self._unacked_bytes = 0

    async def _checkpoint(self) -> None:
        self.durable_seq = await self.barrier()
        self._last_ckpt = time.monotonic()

    async def _loop(self, frames: trio.MemoryReceiveChannel[Batch]) -> None:
        while True:
            timed_out = True
            f: Frame | None = None
            if not self._held:
                with trio.move_on_after(self.checkpoint_s):
                    self._held.extend(_frames_of(await frames.receive()))
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
                    batch = await frames.receive()
                if waiting.cancelled_caught:
                    return
                # Only the wait above is ever cancelled: a TLS send cut half-way breaks the
                # stream for good (the next ack then raised BrokenResourceError). The whole
                # batch is gone through, whatever `done` says meanwhile: nothing is dropped.
                for fr in _frames_of(batch):
                    if fr is not None and fr.kind == Kind.PING:
                        await self._ack(encode_frame(Kind.PONG, b"", self.conn.key))
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
            await self._ack(encode_frame(Kind.PONG, b"", self.conn.key))
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
        if rec.op == Op.FSYNC and not self.durable:
            # `ack: received`: acknowledged on receipt; the periodic checkpoint syncs it.
            self.received = rec.seq
            await self._ack()
            return True
        heavy = _heavy(rec)
        try:
            if heavy:
                await self._answering_keepalives(
                    lambda: trio.to_thread.run_sync(self.apply, rec), frames
                )
            else:
                self.apply(rec)
        except (OSError, ValueError) as e:
            # ValueError: the applier's refusal (RecordRefused, a delta out of sequence).
            log.warning("replication: cannot apply %s %r: %s", rec.op.name, rec.path, e)
            self._reject("apply_failed" if isinstance(e, OSError) else "apply_refused")
            err = json.dumps({"error": f"{rec.op.name} {rec.path!r}: {e}"}).encode()
            await self.conn.send(encode_frame(Kind.ERROR, err, self.conn.key))
            return False
        self.received = rec.seq
        self._unacked += 1
        self._unacked_bytes += len(f.payload)
        if rec.op == Op.FSYNC:
            # Applying a FSYNC made everything applied durable (a thread hop for another
            # barrier here cost a millisecond on every fsync of the application).
            self.durable_seq = rec.seq
            self._last_ckpt = time.monotonic()
            await self._ack()
        elif (
            heavy  # keepalives answered meanwhile carried the ack before it: say it is done
            or self._unacked >= ACK_EVERY_RECORDS
            or self._unacked_bytes >= ACK_EVERY_BYTES
        ):
            await self._ack()
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
