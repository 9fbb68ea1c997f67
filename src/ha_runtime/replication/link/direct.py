"""The link's TLS stream driven directly from trio, once handshaken.

trio's ``SSLStream`` wraps every send and receive in its own machinery: a conflict
detector, an inner lock, a retry loop with checkpoints, then the socket stream's own. On
the primary that was about a third of a small round trip's CPU (a microbenchmark: 410 µs
per 4 KiB echo through ``SSLStream``, 260 µs driving the same objects directly). A 4 KiB
write + fdatasync is one send and one receive on the primary's path.

``DirectTls`` drives the very TLS objects of the handshaken stream (its ``SSLObject`` and
memory BIOs; trio is pinned in pyproject.toml) on the socket's own non-blocking
descriptor, waiting with ``trio.lowlevel.wait_readable``/``wait_writable`` only when the
socket is not ready. One task receives, one sends at a time (``Conn``'s send lock), both in
the trio thread: OpenSSL's object is never used from two threads. The secondary's blocking
lane (``lane.py``) takes the same objects over while it runs, and trio then leaves them
alone. ``SSLStream`` itself is kept for the handshake and for closing.
"""

from __future__ import annotations

import math
import os
import select
import ssl
import time
from dataclasses import dataclass
from typing import Any

import trio

_READ = 1 << 20


@dataclass(frozen=True)
class TlsParts:
    """The TLS objects of a handshaken ``trio.SSLStream`` over TCP, and its descriptor."""

    stream: trio.SSLStream[Any]
    obj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    sock: trio.socket.SocketType
    fd: int

    def open_fd(self) -> int:
        """The descriptor, while the socket is open: once trio closed it, the number may
        already name another file, which a write must never reach."""
        if self.sock.fileno() != self.fd:
            raise trio.ClosedResourceError("the link's socket is closed")
        return self.fd

    def encrypt(self, data: bytes) -> memoryview:
        """``data`` encrypted: the bytes to write to the socket, whole and in order.
        ``trio.BrokenResourceError`` (what trio's stream raises) for a broken TLS state.

        trio holds a server's post-handshake messages (TLS 1.3 session tickets) back to
        send them with the first data: whoever sends first sends them first, or the peer's
        decryption fails."""
        try:
            self.obj.write(data)
        except ssl.SSLError as e:
            raise trio.BrokenResourceError(f"TLS: {e}") from e
        held: bytes = self.stream._delayed_outgoing or b""
        self.stream._delayed_outgoing = None
        return memoryview(held + self.outgoing.read())


def tls_parts(stream: object) -> TlsParts | None:
    """``stream``'s TLS objects if it is TLS over a TCP socket (the real link), else None
    (the tests' memory streams: their callers use the stream's own methods)."""
    if not isinstance(stream, trio.SSLStream):
        return None
    obj, inc, out = (getattr(stream, n, None) for n in ("_ssl_object", "_incoming", "_outgoing"))
    if not (
        isinstance(obj, ssl.SSLObject)
        and isinstance(inc, ssl.MemoryBIO)
        and isinstance(out, ssl.MemoryBIO)
    ):
        return None
    tcp = getattr(stream.transport_stream, "tcp", None)
    if not isinstance(tcp, trio.SocketStream):
        return None
    return TlsParts(stream, obj, inc, out, tcp.socket, tcp.socket.fileno())


class DirectTls:
    """Send and receive over a handshaken TLS stream without ``SSLStream``'s layers."""

    def __init__(self, parts: TlsParts) -> None:
        self.parts = parts
        # The stream ended: cleanly or cut (``eof``), or broke; ``clean``: with the peer's
        # close_notify (where trio's stream returns b"" rather than raising).
        self.ended = False
        self.eof = False
        self.clean = False
        # The receiving task is parked on the socket's readiness, holding nothing decrypted:
        # only then may ``receive_now`` read in its place (the order of the plaintext holds).
        self.waiting = False
        self._poll: select.poll | None = None

    async def send(self, data: bytes) -> None:
        """Encrypt and send all of ``data``. Errors are the ones trio's stream raises:
        ``trio.BrokenResourceError`` for a broken connection or TLS state."""
        await trio.lowlevel.checkpoint_if_cancelled()
        p = self.parts
        wire = p.encrypt(data)
        while wire:
            try:
                n = os.write(p.open_fd(), wire)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(p.fd)
                continue
            except OSError as e:
                raise trio.BrokenResourceError(str(e)) from e
            wire = wire[n:]

    async def receive(self) -> list[bytes] | None:
        """The plaintext received next (at least one piece), or None once the stream ended
        (``eof``: cleanly or cut) or broke."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            parts = self.decrypt()
            if parts:
                if not waited:
                    # Data was there at once: let the other tasks run (a flood of acks
                    # must not starve the file system's requests).
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return parts
            if self.ended:
                return None
            try:
                self.waiting = True
                try:
                    await trio.lowlevel.wait_readable(self.parts.open_fd())
                finally:
                    self.waiting = False
                data = os.read(self.parts.open_fd(), _READ)
            except BlockingIOError:
                waited = True
                continue
            except (OSError, trio.ClosedResourceError):
                # Closed under us (trio's stream said so with ClosedResourceError): the end.
                self.ended = True
                return None
            waited = True
            self.feed(data)

    def receive_now(self, deadline: float) -> list[bytes] | None:
        """Blocking, in the calling task: the plaintext that arrives by ``deadline``
        (monotonic), [] if none did or if the receiving task is not parked on the socket
        (it may hold plaintext this would overtake), None once the stream ended or broke."""
        if not self.waiting or self.ended:
            return []
        try:
            fd = self.parts.open_fd()
        except trio.ClosedResourceError:
            return []
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        while True:
            left = deadline - time.monotonic()
            if not self._poll.poll(max(0, math.ceil(left * 1000))):
                return []
            try:
                data = os.read(fd, _READ)
            except BlockingIOError:
                if left <= 0:
                    return []
                continue
            except OSError:
                self.ended = True
                return None
            self.feed(data)
            parts = self.decrypt()
            if parts:
                return parts
            if self.ended:
                return None
            if left <= 0:
                return []

    def decrypt(self) -> list[bytes]:
        """Every plaintext the TLS buffer holds now; ``ended`` is set once the stream ended
        or broke."""
        parts: list[bytes] = []
        while True:
            try:
                chunk = self.parts.obj.read(_READ)
            except ssl.SSLWantReadError:
                return parts
            except ssl.SSLZeroReturnError:
                self.ended = self.eof = self.clean = True
                return parts
            except ssl.SSLEOFError:
                self.ended = self.eof = True
                return parts
            except ssl.SSLError:
                self.ended = True
                return parts
            if not chunk:
                self.ended = self.eof = self.clean = True
                return parts
            parts.append(chunk)

    def feed(self, data: bytes) -> None:
        """Bytes read from the socket into the TLS buffer (b"": the socket's end)."""
        if data:
            self.parts.incoming.write(data)
        else:
            self.parts.incoming.write_eof()  # the TLS object reports the end (or a cut) next
