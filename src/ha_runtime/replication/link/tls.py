"""TLS for the replication link: one mutually authenticated TLS 1.3 connection.

TLS with the standard ``ssl`` module, the site CA only (no system roots), TLS 1.3 minimum,
client certificates required. The client (``connect``, the primary) checks the server's
certificate names the peer node (``server_hostname``); the server (``serve``, the
secondary) checks the client's certificate names the peer node (CN or DNS SAN). A
certificate from another site's CA fails the handshake; either refusal is logged and
reported through ``on_refused``.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ha_runtime.replication.link.framing import (
    LINK_ERRORS,
    AcceptedKeys,
    Conn,
    LinkLost,
    PeerRefused,
)

log = logging.getLogger("hapair.replication")


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


async def connect(
    *,
    addresses: Sequence[tuple[str, int]],
    peer: str,
    ctx: ssl.SSLContext,
    key: bytes,
    timeout: float,
    on_refused: Callable[[str], None] | None = None,
    accepted: AcceptedKeys | None = None,  # other keys of a site key rotation
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
            return Conn(s, key, peer, accepted)
        errors.append(f"{host}:{port}: timeout")
    raise LinkLost("; ".join(errors) or "no address")


# TLS handshakes in progress at once on the secondary's listener; more connections are
# closed at once (counted): a flood of half-open handshakes cannot exhaust the process.
MAX_HANDSHAKES = 4


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
    accepted: AcceptedKeys | None = None
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
            await self.run(Conn(s, self.key, self.peer, self.accepted))

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
            except* LINK_ERRORS as eg:
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
    accepted: AcceptedKeys | None = None,  # other keys of a site key rotation
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
        peer, ctx, key, handler, on_refused, on_rejected, handshake_timeout, max_handshakes,
        accepted,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        task_status.started(listeners)
        await trio.serve_listeners(lst.one, listeners, handler_nursery=nursery)
