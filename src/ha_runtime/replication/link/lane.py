"""The secondary's blocking lane: the session's TLS stream driven from one worker thread.

Through trio, a 4 KiB write and its fsync crossed the secondary's event loop five times
(the socket's readiness, the TLS stream, the reader task, the channel, the session task,
the acknowledgement's send), each a pass of the scheduler, on the path the application
waits on. In the lane one thread waits on the socket, decrypts, decodes, applies and
acknowledges: a ``poll``, a ``read`` and a ``write`` per operation, nothing else.

The lane drives the very TLS objects of the handshaken ``trio.SSLStream`` (its
``SSLObject`` and memory BIOs; trio is pinned in pyproject.toml), on the socket's own
non-blocking descriptor, decrypting as ``direct.DirectTls`` does in trio. It is only ever
used while no trio task touches the stream: the session's reader task is the one caller,
and the session task sends only while it is not waiting for frames (``link.secondary``).
Frames already decoded are handed out first.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time

import trio

from ha_runtime.replication.journal import Frame
from ha_runtime.replication.link.direct import DirectTls, TlsParts, tls_parts
from ha_runtime.replication.link.framing import Conn

_READ = 1 << 20


class BlockingTls:
    """Receive frames and send bytes over ``conn`` from one thread, blocking."""

    def __init__(self, conn: Conn, parts: TlsParts) -> None:
        self.conn = conn
        self._parts = parts
        self._tls = DirectTls(parts)  # its decryption and buffer, driven from this thread
        self._fd = parts.fd
        # One thread receives while another may send (the session task's acknowledgements
        # after a control request): OpenSSL's object is not safe to use from two at once,
        # and one send's bytes must leave whole before the next one's.
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        # Written by ``stop`` (from the trio thread): a waiting ``receive`` returns at once.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Built once: ``_wait`` runs on every operation. One per direction: the receiving
        # thread and a sender (one at a time, ``_send_lock``) may wait at once.
        self._polls = {ev: self._poll_for(ev) for ev in (select.POLLIN, select.POLLOUT)}
        self.stopped = False

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    def stop(self) -> None:
        self.stopped = True
        self.nudge()

    def nudge(self) -> None:
        """A waiting ``receive`` returns [] now (a worker's apply is done)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def receive(self, timeout: float) -> list[Frame] | None:
        """The frames decoded next (at least one); [] after ``timeout`` seconds without one,
        once nudged or stopped; None at the end of the stream or on a rejected frame (the reason is
        in ``conn.failed``), as ``Conn.recv_batch``."""
        deadline = time.monotonic() + timeout
        while True:
            frames = self.conn.take_decoded()
            if frames:
                return frames
            if self.conn.failed:
                return None
            plain = self._decrypt()
            if plain:
                frames = self.conn.feed(plain)
                if frames:
                    return frames
            if self._tls.ended:
                if self._tls.eof:
                    self.conn.finish()  # a frame cut short is a rejected one
                return None
            if plain:
                continue
            if self.stopped or not self._wait(select.POLLIN, deadline):
                return []
            if not self._read():
                return None

    def send(self, data: bytes) -> None:
        """Encrypt and send all of ``data``; a broken connection raises
        ``trio.BrokenResourceError``, as trio's stream would."""
        with self._send_lock:
            with self._tls_lock:
                wire = self._parts.encrypt(data)
            self._send_wire(wire)
        self.conn.bytes_sent += len(data)

    def _send_wire(self, wire: memoryview) -> None:
        while wire:
            try:
                n = os.write(self._parts.open_fd(), wire)
            except BlockingIOError:
                if self.stopped or not self._wait(select.POLLOUT, None):
                    raise trio.BrokenResourceError("stopped while sending") from None
                continue
            except OSError as e:
                raise trio.BrokenResourceError(str(e)) from e
            wire = wire[n:]

    def _decrypt(self) -> list[bytes]:
        with self._tls_lock:
            return self._tls.decrypt()

    def _read(self) -> bool:
        """Move what the socket holds into the TLS buffer; False once it is closed."""
        try:
            data = os.read(self._parts.open_fd(), _READ)
        except BlockingIOError:
            return True
        except (OSError, trio.ClosedResourceError):
            return False
        with self._tls_lock:
            self._tls.feed(data)
        return True

    def _poll_for(self, events: int) -> select.poll:
        p = select.poll()
        p.register(self._fd, events | select.POLLERR | select.POLLHUP)
        p.register(self._wake_r, select.POLLIN)
        return p

    def _wait(self, events: int, deadline: float | None) -> bool:
        """Whether the socket became ready for ``events`` before ``deadline`` (and the lane
        was not stopped)."""
        p = self._polls[events]
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = p.poll(None if left is None else int(left * 1000) + 1)
            if self.stopped:
                return False
            if any(fd == self._wake_r for fd, _ in ready):
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 64)
                return False
            if any(fd == self._fd for fd, _ in ready):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False


def open_lane(conn: Conn) -> BlockingTls | None:
    """A lane for ``conn`` if it is TLS over a TCP socket (the secondary's real link), else
    None: the session then runs in trio alone (the tests' memory streams)."""
    parts = tls_parts(conn.stream)
    return None if parts is None else BlockingTls(conn, parts)
