"""Control API: one JSON request and one JSON response per connection on a Unix socket.

The socket is created mode 0600 and every connection's peer credentials are checked
(SO_PEERCRED): only root (the daemon's own uid) may query or command the cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ApiError(Exception):
    """A refusal or bad request: its message goes back to the client verbatim."""


def peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def open_listener(path: Path) -> trio.SocketListener:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket file is born 0600: no window where others can connect. The umask is
    # process-wide, so the bind is synchronous: no other task may run (and inherit or
    # restore the wrong umask) between the two os.umask calls.
    old = os.umask(0o177)
    try:
        raw.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock = trio.socket.from_stdlib_socket(raw)
    sock.listen(16)
    return trio.SocketListener(sock)


async def serve(path: Path, handler: Handler, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    listener = await open_listener(path)
    task_status.started()
    try:

        async def one(stream: trio.SocketStream) -> None:
            await _serve_one(stream, handler)

        await trio.serve_listeners(one, [listener])
    finally:
        path.unlink(missing_ok=True)


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        try:
            uid = peer_uid(stream.socket)
            if uid != os.geteuid():
                await _reply(stream, {"ok": False, "error": "permission denied: root only"})
                return
            request = await _read_request(stream)
        except (OSError, ValueError, TypeError, trio.BrokenResourceError) as exc:
            await _reply(stream, {"ok": False, "error": f"bad request: {exc}"})
            return
        try:
            result = await handler(request)
            response: dict[str, Any] = {"ok": True, "result": result}
        except ApiError as exc:
            response = {"ok": False, "error": str(exc)}
        except Exception as exc:  # the API must outlive a bug in one command
            log.exception("api: command %r failed", request.get("command"))
            response = {"ok": False, "error": f"internal error: {exc}"}
        await _reply(stream, response)


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    data = json.loads(buf.split(b"\n", 1)[0] or b"null")
    if not isinstance(data, dict) or not isinstance(data.get("command"), str):
        raise TypeError('expected a JSON object with a "command" string')
    return data


async def _reply(stream: trio.SocketStream, response: dict[str, Any]) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all((json.dumps(response) + "\n").encode())
