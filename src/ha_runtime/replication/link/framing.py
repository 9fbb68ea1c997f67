"""Frames over one authenticated stream (``Conn``), the control frame codec, and the
link's errors. The frame and record formats are ``journal``'s.

Frames are MAC'd with a key derived from the site key (``journal``), so a stream of garbage
is dropped at its first frame, nothing applied. During a site key rotation the tags of the
other key are taken too (``AcceptedKeys``): a node that switched keys and one that has not
yet still hear each other. The primary's frames drop that tag
(``untagged``, frame version 3) once the secondary's answer to the HELLO says it reads them
(``Conn.accept_untagged``): inside TLS 1.3 the tag only repeated the AEAD's check, at about
a fifth of the replicas' CPU on 1 MiB writes. Garbage is still dropped at its first frame
(magic, version, length, kind, strict record decoding), counted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ha_runtime.replication.journal import Frame, FrameDecoder, Kind, encode_frame
from ha_runtime.replication.link.direct import DirectTls, tls_parts

log = logging.getLogger("hapair.replication")

_CTL = struct.Struct("!I")


class LinkLost(Exception):
    """The peer did not answer in time, closed, or reported a fatal error."""


class PeerRefused(Exception):
    pass


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


@dataclass(frozen=True)
class AcceptedKeys:
    """During a site key rotation: the other derived keys a frame's tag may be made with,
    and what to call for each frame taken with one (a status counter)."""

    keys: tuple[bytes, ...] = field(default=(), repr=False)
    on_accepted: Callable[[], None] | None = None


# The connection broke (the peer went away mid-send, reset).
LINK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)


class Conn:
    """Frames over one authenticated stream. ``recv`` returns None at end of stream or on a
    rejected frame (the reason is in ``failed``); it never raises for bad input."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        key: bytes,
        peer: str,
        accepted: AcceptedKeys | None = None,
    ) -> None:
        self.stream = stream
        self.key = key  # frames are sent with the current key only
        self.peer = peer
        acc = accepted or AcceptedKeys()
        self._decoder = FrameDecoder(key, accepted=acc.keys, on_accepted=acc.on_accepted)
        self._frames: deque[Frame] = deque()
        self._send_lock = trio.Lock()
        # While the secondary's blocking lane owns the TLS object, sends go through it.
        self._blocking_send: Callable[[bytes], None] | None = None
        # TLS over TCP (the real link) is driven directly, without SSLStream's layers.
        parts = tls_parts(stream)
        self._direct = None if parts is None else DirectTls(parts)
        self.bytes_sent = 0
        self.bytes_received = 0

    def accept_untagged(self) -> None:
        """Read frames without a tag from now on (the HELLO's answer offers them: TLS
        authenticates them)."""
        self._decoder.untagged = True

    @property
    def failed(self) -> str | None:
        """Why the stream was dropped (a rejected frame), None at a clean end."""
        return self._decoder.failed

    def send_through(self, send: Callable[[bytes], None] | None) -> None:
        """Send through ``send`` (blocking, run in a worker thread) instead of the stream,
        or through the stream again (None)."""
        self._blocking_send = send

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            if self._blocking_send is not None:
                await trio.to_thread.run_sync(self._blocking_send, data)
                return
            if self._direct is not None:
                await self._direct.send(data)
            else:
                await self.stream.send_all(data)
            self.bytes_sent += len(data)

    async def recv(self) -> Frame | None:
        if not self._frames and not await self._fill():
            return None
        return self._frames.popleft()

    async def recv_batch(self) -> list[Frame] | None:
        """Every frame received and not yet returned (at least one), or None as ``recv``.
        The secondary's reader hands these on as one item: a write and its fsync arrive in
        one TLS record and cross to the applying task together."""
        if not self._frames and not await self._fill():
            return None
        return self.take_decoded()

    async def _fill(self) -> bool:
        """Receive until at least one frame is decoded; False at end of stream or on a
        rejected frame."""
        while not self._frames:
            if self.failed:
                return False
            if self._direct is not None:
                parts = await self._direct.receive()
                if parts is None:
                    if self._direct.clean:
                        self.finish()  # as after trio's b"": a frame cut short is rejected
                    return False
                self._frames.extend(self.feed(parts))
                continue
            try:
                data = await self.stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
                return False
            if not data:
                self.finish()
                return False
            self._frames.extend(self.feed(self._more(data)))
        return True

    def receive_now(self, deadline: float) -> list[Frame] | None:
        """Blocking, in the calling task: the frames that arrive by ``deadline`` (monotonic);
        [] if none did, or if this is not the direct TLS stream or the receiving task is not
        parked in ``recv`` with nothing pending; None once the stream ended (a rejected frame
        leaves ``failed`` set after the frames before it)."""
        if self._direct is None or self._frames:
            return []
        parts = self._direct.receive_now(deadline)
        if parts is None:
            if self._direct.clean:
                self.finish()
            return None
        return self.feed(parts) if parts else []

    def feed(self, parts: Sequence[bytes | bytearray]) -> list[Frame]:
        """Decode received plaintext (trio's stream or the secondary's blocking lane)."""
        # Joined once, then parsed in place: fed record by record (16 KiB), a 1 MiB frame
        # grew the decoder's buffer 64 times, each growth a copy of all of it (13 % of the
        # secondary's CPU on 1 MiB writes).
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        self.bytes_received += len(joined)
        return self._decoder.feed(joined)

    def finish(self) -> None:
        """The stream ended: a frame cut short is a rejected one."""
        self._decoder.finish()

    def take_decoded(self) -> list[Frame]:
        """Frames decoded and not yet returned (the lane takes them over from trio)."""
        out = list(self._frames)
        self._frames.clear()
        return out

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
