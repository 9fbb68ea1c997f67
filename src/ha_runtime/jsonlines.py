"""JSON objects, one a line, read from a trio stream: the protocol between the daemon's
mirror supervisor and each replication child (both ends read it the same way)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio

CHUNK = 65536


async def json_objects(stream: trio.abc.ReceiveStream) -> AsyncIterator[dict[str, Any]]:
    """Each line that is a JSON object, until the stream ends; other lines are skipped (the
    other end is our own process, but a torn or foreign line must not end the reader)."""
    buf = b""
    while chunk := await stream.receive_some(CHUNK):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                yield msg
