"""The replication link: one mutually authenticated TLS 1.3 connection carrying journal
frames in order, with acknowledgements and a timeout.

- TLS with the standard ``ssl`` module, the site CA only (no system roots), TLS 1.3 minimum,
  client certificates required. The client checks the server's certificate names the peer
  node (``server_hostname``); the server checks the client's certificate names the peer node
  (CN or DNS SAN). A certificate from another site's CA fails the handshake; either refusal
  is logged and reported through ``on_refused``.
- Frames are additionally MAC'd with a key derived from the site key (``journal``), so a
  stream of garbage is dropped at its first frame, nothing applied. The primary's frames
  drop that tag (``untagged``, frame version 3) once the secondary's answer to the HELLO
  says it reads them: inside TLS 1.3 the tag only repeated the AEAD's check, at about a
  fifth of the replicas' CPU on 1 MiB writes. Garbage is still dropped at its first frame (magic,
  version, length, kind, strict record decoding), counted.
- ``PrimaryLink`` numbers records, sends them in order, tracks acks and the window of
  records not yet durable on the secondary, and declares the link lost when an awaited ack or
  a keepalive answer is later than ``timeout``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import ssl
import struct
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from ha_runtime.replication.journal import (
    Frame,
    FrameDecoder,
    Kind,
    Op,
    Record,
    RecordError,
    decode_record,
    encode_ack,
    encode_frame,
    record_frame,
)

log = logging.getLogger("hapair.replication")

_CTL = struct.Struct("!I")


class LinkLost(Exception):
    """The peer did not answer in time, closed, or reported a fatal error."""


class PeerRefused(Exception):
    pass


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _context(tls: TlsFiles, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if not server:
        ctx.check_hostname = True
    return ctx


def server_context(tls: TlsFiles) -> ssl.SSLContext:
    return _context(tls, server=True)


def client_context(tls: TlsFiles) -> ssl.SSLContext:
    return _context(tls, server=False)


def cert_names(cert: dict[str, Any] | None) -> set[str]:
    names: set[str] = set()
    if not cert:
        return names
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                names.add(v)
    for k, v in cert.get("subjectAltName", ()):
        if k == "DNS":
            names.add(v)
    return names


def encode_control(
    obj: dict[str, Any], body: bytes = b"", key: bytes = b"", *, tag: bool = True
) -> bytes:
    js = json.dumps(obj, separators=(",", ":")).encode()
    return encode_frame(Kind.CONTROL, _CTL.pack(len(js)) + js + body, key, tag=tag)


def decode_control(f: Frame) -> tuple[dict[str, Any], bytes] | None:
    p = f.payload
    if len(p) < _CTL.size:
        return None
    (n,) = _CTL.unpack_from(p)
    if _CTL.size + n > len(p):
        return None
    try:
        obj = json.loads(bytes(p[_CTL.size : _CTL.size + n]))
    # RecursionError: deeply nested JSON ("[[[[...") overflows the decoder's stack.
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    return obj, bytes(p[_CTL.size + n :])


def _check_peer(s: trio.SSLStream[Any], peer: str) -> None:
    names = cert_names(s.getpeercert())
    if peer not in names:
        raise PeerRefused(f"certificate names {sorted(names)}, expected {peer!r}")


class _BigReads(trio.abc.Stream):
    """A TCP stream whose default read is large. trio's SSLStream refills its TLS buffer with
    the transport's default read (64 KiB): a 1 MiB frame took 16 socket reads, each a pass
    through the scheduler."""

    def __init__(self, tcp: trio.SocketStream, size: int = 1 << 20) -> None:
        self.tcp = tcp
        self.size = size

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.tcp.receive_some(max_bytes or self.size)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.tcp.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tcp.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.tcp.aclose()


def _tls(tcp: trio.SocketStream, ctx: ssl.SSLContext, **kw: Any) -> trio.SSLStream[Any]:
    return trio.SSLStream(_BigReads(tcp), ctx, **kw)


class Conn:
    """Frames over one authenticated stream. ``recv`` returns None at end of stream or on a
    rejected frame (the reason is in ``decoder.failed``); it never raises for bad input."""

    def __init__(self, stream: trio.abc.Stream, key: bytes, peer: str) -> None:
        self.stream = stream
        self.key = key
        self.peer = peer
        self.decoder = FrameDecoder(key)
        self._frames: deque[Frame] = deque()
        self._send_lock = trio.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)
            self.bytes_sent += len(data)

    async def recv(self) -> Frame | None:
        while not self._frames:
            if self.decoder.failed:
                return None
            try:
                data = await self.stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
                return None
            if not data:
                self.decoder.finish()
                return None
            for part in self._more(data):
                self.bytes_received += len(part)
                self._frames.extend(self.decoder.feed(part))
        return self._frames.popleft()

    def _more(self, first: bytes | bytearray) -> list[bytes | bytearray]:
        """``first`` and the TLS records already received after it. trio's SSLStream returns
        one record (16 KiB) per receive_some, each with a trip through the scheduler: 64 for
        a 1 MiB frame, the secondary's largest cost. Any error is left for the next
        receive_some to report (trio is pinned: ``_ssl_object`` is its TLS object)."""
        obj = getattr(self.stream, "_ssl_object", None)
        parts = [first]
        if isinstance(obj, ssl.SSLObject):
            with contextlib.suppress(ssl.SSLError):
                while chunk := obj.read(1 << 20):
                    parts.append(chunk)
        return parts

    async def aclose(self) -> None:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError
            ):
                await self.stream.aclose()


async def connect(
    *,
    addresses: Sequence[tuple[str, int]],
    peer: str,
    ctx: ssl.SSLContext,
    key: bytes,
    timeout: float,
    on_refused: Callable[[str], None] | None = None,
) -> Conn:
    """Connect to the first address (in preference order) that completes a TLS handshake."""
    errors: list[str] = []
    for host, port in addresses:
        with trio.move_on_after(timeout):
            try:
                tcp = await trio.open_tcp_stream(host, port)
            except OSError as e:
                errors.append(f"{host}:{port}: {e}")
                continue
            s = _tls(tcp, ctx, server_hostname=peer)
            try:
                await s.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError, OSError) as e:
                msg = f"{host}:{port}: TLS handshake with {peer} refused: {e.__cause__ or e}"
                log.warning("replication: %s", msg)
                if on_refused:
                    on_refused(msg)
                errors.append(msg)
                await tcp.aclose()
                continue
            return Conn(s, key, peer)
        errors.append(f"{host}:{port}: timeout")
    raise LinkLost("; ".join(errors) or "no address")


# TLS handshakes in progress at once on the secondary's listener; more connections are
# closed at once (counted): a flood of half-open handshakes cannot exhaust the process.
MAX_HANDSHAKES = 4
_LINK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)


@dataclass
class _Listener:
    """The secondary's side of ``serve``: handshakes, then one session at a time."""

    peer: str
    ctx: ssl.SSLContext
    key: bytes
    handler: Callable[[Conn], Awaitable[None]]
    on_refused: Callable[[str], None] | None
    on_rejected: Callable[[str], None] | None
    handshake_timeout: float
    max_handshakes: int
    current: list[trio.CancelScope] = field(default_factory=list)
    session: trio.Lock = field(default_factory=trio.Lock)  # held by the one session running

    def __post_init__(self) -> None:
        self.handshakes = trio.Semaphore(self.max_handshakes)
        self.busy = 0  # connections closed for the handshake limit
        self._busy_logged = -math.inf

    def refuse(self, msg: str) -> None:
        log.warning("replication: %s", msg)
        if self.on_refused:
            self.on_refused(msg)

    async def accept(self, tcp: trio.SocketStream) -> trio.SSLStream[Any] | None:
        s = _tls(tcp, self.ctx, server_side=True)
        where = "?"
        try:
            host, port_ = tcp.socket.getpeername()[:2]
            where = f"{host}:{port_}"
            with trio.fail_after(self.handshake_timeout):
                await s.do_handshake()
            _check_peer(s, self.peer)
        except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError, OSError) as e:
            self.refuse(f"{where}: TLS handshake refused: {e.__cause__ or e!r}")
            await tcp.aclose()
            return None
        except PeerRefused as e:
            self.refuse(f"{where}: peer refused: {e}")
            await s.aclose()
            return None
        return s

    async def one(self, tcp: trio.SocketStream) -> None:
        try:
            self.handshakes.acquire_nowait()
        except trio.WouldBlock:
            # Counted each, logged at most once a second: a flood must not flood the log.
            self.busy += 1
            if self.on_rejected:
                self.on_rejected("handshake_busy")
            if time.monotonic() - self._busy_logged >= 1:
                self._busy_logged = time.monotonic()
                log.warning(
                    "replication: %d handshakes in progress: connection closed (%d so far)",
                    self.max_handshakes, self.busy,
                )  # fmt: skip
            await tcp.aclose()
            return
        try:
            s = await self.accept(tcp)
        finally:
            self.handshakes.release()
        if s is not None:
            await self.run(Conn(s, self.key, self.peer))

    async def run(self, conn: Conn) -> None:
        for cs in self.current:
            cs.cancel()
        with trio.CancelScope() as cs:
            self.current.append(cs)
            try:
                # The previous session has returned, its worker threads too, before this one
                # starts: the old one's barrier cleared the new one's dirty set.
                async with self.session:
                    await self.handler(conn)
            except* _LINK_ERRORS as eg:
                # The primary went away mid-send (crashed, reset): this session ends, the
                # listener stays for the next one (it used to take the whole process down).
                log.warning(
                    "replication: connection from %s broken: %r", self.peer, eg.exceptions[0]
                )
            except* Exception as eg:
                # Whatever else went wrong ends this link, never the service.
                log.exception("replication: session with %s failed", self.peer, exc_info=eg)
                if self.on_rejected:
                    self.on_rejected("session_error")
            finally:
                self.current.remove(cs)
                await conn.aclose()


async def serve(
    *,
    addresses: Sequence[str],
    port: int,
    peer: str,
    ctx: ssl.SSLContext,
    key: bytes,
    handler: Callable[[Conn], Awaitable[None]],
    on_refused: Callable[[str], None] | None = None,
    on_rejected: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    handshake_timeout: float = 5.0,
    max_handshakes: int = MAX_HANDSHAKES,
) -> None:
    """Listen on every address; authenticate the peer; run ``handler`` for one connection at
    a time: a new authenticated connection cancels the previous session and starts once it
    has returned (its worker threads included), so two sessions never share the applier.
    At most ``max_handshakes`` handshakes run at once. ``on_refused`` gets a message for
    each refused connection; ``on_rejected`` a reason (counter) for connections closed for
    the handshake limit and sessions that ended on an unexpected error."""
    listeners: list[trio.SocketListener] = []
    for a in addresses:
        listeners += await trio.open_tcp_listeners(port, host=a)
    lst = _Listener(
        peer, ctx, key, handler, on_refused, on_rejected, handshake_timeout, max_handshakes
    )
    async with trio.open_nursery() as nursery:
        task_status.started(listeners)
        await trio.serve_listeners(lst.one, listeners, handler_nursery=nursery)


# --------------------------------------------------------------------------- primary side


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
    _wake_sender: trio.Event = field(default_factory=trio.Event)
    _ack_changed: trio.Event = field(default_factory=trio.Event)
    _lost: trio.Event = field(default_factory=trio.Event)
    _replies: dict[int, tuple[dict[str, Any], bytes]] = field(default_factory=dict)
    _req: int = 0
    _last_heard: float = field(default_factory=time.monotonic)
    # Frames from the secondary refused (each drops the link), by reason, as on the secondary.
    rejected: Counter[str] = field(default_factory=Counter)
    on_rejected: Callable[[str], None] | None = None
    # Send version 3 frames (no tag): set once the secondary said it reads them (HELLO).
    untagged: bool = False

    def submit(self, rec: Record) -> int:
        """Queue a record (assigning its sequence number). Never blocks, never reorders."""
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
        self._wake_sender.set()
        return self.seq

    def submit_control(self, obj: dict[str, Any], body: bytes = b"") -> int:
        if self.lost_reason:
            raise LinkLost(self.lost_reason)
        self._req += 1
        frame = encode_control({**obj, "id": self._req}, body, self.conn.key, tag=not self.untagged)
        self._out.append(frame)
        self._wake_sender.set()
        return self._req

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
        """Wait until the secondary acknowledged ``seq`` (durably in durable mode)."""
        try:
            with trio.fail_after(self.timeout if timeout is None else timeout):
                while (self.durable_seq if self.durable else self.received_seq) < seq:
                    await self._wait_change()
        except trio.TooSlowError:
            self.fail(f"no acknowledgement within {self.timeout:g} s")
            raise LinkLost(self.lost_reason) from None

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
        self._wake_sender.set()

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
            await self._lost.wait()
            n.cancel_scope.cancel()
        await self.conn.aclose()

    async def _sender(self) -> None:
        while True:
            await self._wake_sender.wait()
            self._wake_sender = trio.Event()
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

    async def _receiver(self) -> None:
        while True:
            f = await self.conn.recv()
            if f is None:
                if self.conn.decoder.failed:
                    self._reject(self.conn.decoder.failed)
                self.fail(f"connection closed ({self.conn.decoder.failed or 'end of stream'})")
                return
            self._last_heard = time.monotonic()
            if f.kind == Kind.ACK:
                a = f.ack()
                if a is None:
                    self._reject("malformed_ack")
                    self.fail("malformed ack")
                    return
                self._on_ack(*a)
            elif f.kind == Kind.CONTROL:
                c = decode_control(f)
                if c is None or not isinstance(c[0].get("id"), int):
                    self._reject("malformed_control")
                    self.fail("malformed control reply")
                    return
                self._replies[c[0]["id"]] = c
                self._notify()
            elif f.kind == Kind.ERROR:
                obj = f.json() or {}
                self.fail(f"secondary error: {obj.get('error', '?')}")
                return
            elif f.kind != Kind.PONG:
                self._reject(f"unexpected_{f.kind.name.lower()}")
                self.fail(f"unexpected frame {f.kind.name}")
                return

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
            self._wake_sender.set()
            if time.monotonic() - self._last_heard > self.timeout:
                self.fail(f"peer silent for {self.timeout:g} s")
                return


# --------------------------------------------------------------------------- secondary side

T = TypeVar("T")

# Receipt acks free the primary's send queue (max_inflight, 64 MiB by default): acked by
# count alone, a stream of 1 MiB writes filled it and stalled until the next checkpoint.
ACK_EVERY_RECORDS = 256
ACK_EVERY_BYTES = 4 << 20
# Records at least this large are applied in a worker thread while keepalives are answered
# (and the next frames decrypted meanwhile).
HEAVY_RECORD_BYTES = 256 << 10


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
    _held: list[Frame | None] = field(default_factory=list)

    async def run(self) -> None:
        send_ch, recv_ch = trio.open_memory_channel[Frame | None](64)

        async def reader() -> None:
            # A separate task: cancelling a TLS receive half-way is not safe, a channel is.
            while True:
                fr = await self.conn.recv()
                await send_ch.send(fr)
                if fr is None:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            try:
                await self._loop(recv_ch)
            except Exception as e:
                if _only(e, _LINK_ERRORS):
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
        with trio.move_on_after(1), contextlib.suppress(*_LINK_ERRORS, OSError):
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

    async def _loop(self, frames: trio.MemoryReceiveChannel[Frame | None]) -> None:
        while True:
            timed_out = True
            f: Frame | None = None
            if self._held:
                f = self._held.pop(0)
                timed_out = False
            else:
                with trio.move_on_after(self.checkpoint_s):
                    f = await frames.receive()
                    timed_out = False
            if f is None and not timed_out:
                if self.conn.decoder.failed:
                    self._reject(self.conn.decoder.failed)
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
        self, work: Callable[[], Awaitable[T]], frames: trio.MemoryReceiveChannel[Frame | None]
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
                    fr = await frames.receive()
                if waiting.cancelled_caught:
                    return
                # Only the wait above is ever cancelled: a TLS send cut half-way breaks the
                # stream for good (the next ack then raised BrokenResourceError).
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

    async def _control(self, c: Any, frames: trio.MemoryReceiveChannel[Frame | None]) -> Any:
        """Run a control request (a digest or signatures of a large tree may take longer than
        the link's timeout) while answering keepalives."""

        async def work() -> tuple[dict[str, Any], bytes]:
            try:
                return await self.control(*c)
            except (OSError, ValueError) as e:
                return {"error": str(e)}, b""

        return await self._answering_keepalives(work, frames)

    async def _handle(self, f: Frame, frames: trio.MemoryReceiveChannel[Frame | None]) -> bool:
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

    async def _record(self, f: Frame, frames: trio.MemoryReceiveChannel[Frame | None]) -> bool:
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


def backoff(attempt: int) -> float:
    return min(2.0, 0.1 * math.pow(2, attempt))
