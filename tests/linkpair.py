"""Both ends of a real replication link on loopback, for tests of one end's logic.

node2 serves (TLS, the site's frames) and runs `handler` on the connection it accepts;
node1 connects. Shared by the primary's tests (tests/unit/replication) and the full
resync measured in tests/integration/replication, which differ only in the session.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ha_runtime.replication.link import tls as T
from ha_runtime.replication.link.framing import Conn


async def serve_secondary(
    n: trio.Nursery,
    tls: T.TlsFiles,
    key: bytes,
    port: int,
    handler: Callable[[Conn], Awaitable[None]],
    **kw: Any,
) -> None:
    """node2's server on 127.0.0.1:`port` with node2's `tls`, running in `n`, accepting
    node1 only; `kw` goes to transport.serve (on_refused ...)."""

    def serve(task_status: Any) -> Awaitable[None]:
        return T.serve(
            addresses=["127.0.0.1"], port=port, peer="node1", ctx=T.server_context(tls),
            key=key, handler=handler, task_status=task_status, **kw,
        )  # fmt: skip

    await n.start(serve)


async def connect_primary(tls: T.TlsFiles, key: bytes, port: int, timeout: float = 1) -> Conn:
    """node1's connection, with node1's `tls`, to node2's server."""
    return await T.connect(
        addresses=[("127.0.0.1", port)], peer="node2", ctx=T.client_context(tls), key=key,
        timeout=timeout,
    )  # fmt: skip
