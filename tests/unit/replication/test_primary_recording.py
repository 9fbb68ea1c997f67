"""The primary's Sink (``before``/``after``) records every change durably before it returns,
whatever moment the link is lost at. A real service, a real DirtyLog and ActivityLog on
disk, a real PrimaryLink over loopback TLS to a real secondary session."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ha_runtime.config import (
    ClusterConfig,
    HeartbeatSpec,
    ModuleConfig,
    NodeSpec,
    ReplicationSettings,
    RestartPolicy,
    ScriptsSpec,
    TlsSpec,
)
from ha_runtime.replication import delta as D
from ha_runtime.replication import tree
from ha_runtime.replication.activitylog import ActivityLog
from ha_runtime.replication.dirtylog import DirtyLog
from ha_runtime.replication.journal import Op, Record, derive_key
from ha_runtime.replication.link.framing import Conn
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.link.secondary import SecondarySession
from ha_runtime.replication.link.tls import TlsFiles, client_context, connect, serve, server_context
from ha_runtime.replication.secondary.applier import Applier
from ha_runtime.replication.service import ReplicationService

SITE_KEY = b"k" * 48
KEY = derive_key(SITE_KEY)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service(tmp: Path, tls: TlsFiles, port: int) -> ReplicationService:
    nodes = (NodeSpec("node1", {"lan": "127.0.0.1"}), NodeSpec("node2", {"lan": "127.0.0.1"}))
    cluster = ClusterConfig(
        path=tmp / "c.yml", node="node1", nodes=nodes, heartbeat_port=7440,
        site_key=tmp / "key", tls=TlsSpec(tls.ca, tls.cert, tls.key), api_socket=tmp / "s",
        metrics_address=None, state_dir=tmp / "node1", modules_dir=tmp,
    )  # fmt: skip
    module = ModuleConfig(
        path=tmp / "m.yml", name="demo", type="mirror", nodes=("node1", "node2"),
        default_primary="node1", failback="manual", vip=None, heartbeat=HeartbeatSpec(),
        witness=(), scripts=ScriptsSpec(), checkers=(), restart_policy=RestartPolicy(),
        replicated_dirs=(tmp / "app",),
    )  # fmt: skip
    st = ReplicationSettings(port=port, networks=("lan",), site_key=SITE_KEY)
    svc = ReplicationService(module, cluster, st)
    svc.backing.mkdir(parents=True)
    return svc


@asynccontextmanager
async def _in_sync(
    tmp: Path, site: dict[str, TlsFiles]
) -> AsyncIterator[tuple[ReplicationService, PrimaryLink]]:
    """A primary service in sync over a real link to a real secondary session."""
    port = _free_port()
    applier = Applier(tmp / "second")

    async def barrier() -> int:
        applier.barrier()
        return applier.durable_seq

    async def control(obj: dict[str, object], body: bytes) -> tuple[dict[str, object], bytes]:
        return {}, b""

    async def handler(conn: Conn) -> None:
        await SecondarySession(conn, applier.apply, barrier, control).run()

    svc = _service(tmp, site["node1"], port)
    async with trio.open_nursery() as n:
        await n.start(
            lambda task_status: serve(
                addresses=["127.0.0.1"], port=port, peer="node1",
                ctx=server_context(site["node2"]), key=KEY, handler=handler,
                task_status=task_status,
            )
        )  # fmt: skip
        conn = await connect(
            addresses=[("127.0.0.1", port)], peer="node2",
            ctx=client_context(site["node1"]), key=KEY, timeout=1,
        )  # fmt: skip
        link = PrimaryLink(conn, timeout=3)
        n.start_soon(link.run)
        svc.primary.dirty = DirtyLog(svc.layout.dirty)
        svc.primary.dirty.open()
        svc.primary.activity = ActivityLog(svc.layout.activity)
        svc.primary.activity.open()
        svc.primary.link = link
        svc.context.status.state = "sync"
        try:
            yield svc, link
        finally:
            svc.primary.dirty.close()
            svc.primary.activity.close()
            applier.close()
            n.cancel_scope.cancel()


def _on_disk(path: Path) -> set[bytes]:
    """The paths a freshly opened copy of the dirty log file names (what a restart reads)."""
    log = DirtyLog(path)
    log.open()
    try:
        st = log.state
        return set(st.ranges) | st.touched | st.scope
    finally:
        log.close()


def _durable(log: DirtyLog) -> bool:
    """Everything appended to the log has been fsync'd."""
    return log._synced >= log._written


def _write(svc: ReplicationService, rec: Record) -> None:
    fd = os.open(svc.backing / os.fsdecode(rec.path), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, rec.data, rec.offset)
    finally:
        os.close(fd)


def test_a_write_after_the_link_was_lost_in_sync_is_recorded_before_it_is_performed(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    """The link is lost (a timeout, a reset) and the service has not gone ALONE yet (the
    connect loop runs later): the next operation is in the dirty log, durably, before it
    touches the backing directory."""

    async def main() -> None:
        async with _in_sync(tmp_path, site) as (svc, link):
            link.fail("connection reset")
            rec = Record(0, Op.WRITE, b"f", offset=0, data=b"x" * 4096)
            await svc.primary.before(rec)
            assert svc.primary.dirty is not None
            assert b"f" in _on_disk(svc.layout.dirty), "performed with no record of it"
            assert _durable(svc.primary.dirty)
            _write(svc, rec)
            svc.primary.after(rec)
            assert _durable(svc.primary.dirty)

    trio.run(main)


def test_a_write_whose_link_is_lost_before_it_is_shipped_is_durable_in_the_dirty_log(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    """before() ran in sync (activity log), the link is lost, the operation is performed and
    cannot be shipped: after() returns only once the dirty log holds it durably (the activity
    log is emptied by the next resync before that log is synced otherwise)."""

    async def main() -> None:
        async with _in_sync(tmp_path, site) as (svc, link):
            rec = Record(0, Op.WRITE, b"g", offset=0, data=b"y" * 4096)
            await svc.primary.before(rec)
            link.fail("no acknowledgement within 3 s")
            _write(svc, rec)
            svc.primary.after(rec)
            assert svc.primary.dirty is not None
            assert b"g" in _on_disk(svc.layout.dirty)
            assert _durable(svc.primary.dirty), "after() returned with the record not fsync'd"

    trio.run(main)


def test_a_namespace_change_after_the_link_was_lost_is_recorded(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    async def main() -> None:
        async with _in_sync(tmp_path, site) as (svc, link):
            link.fail("connection reset")
            rec = Record(0, Op.MKDIR, b"d", mode=0o40755)
            await svc.primary.before(rec)
            os.mkdir(svc.backing / "d")
            svc.primary.after(rec)
            assert svc.primary.dirty is not None
            assert b"d" in _on_disk(svc.layout.dirty)
            assert _durable(svc.primary.dirty)

    trio.run(main)


def test_an_unexpected_error_in_a_session_is_a_link_failure_not_an_exit(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    """A session that fails on something unforeseen (here the peer's listing is malformed)
    ends that link only: the primary reconnects with backoff, counts it, and the next
    session brings the peer in sync. Before, the exception ended the primary's child and
    unmounted the application's directory under it."""
    port = _free_port()
    second = tmp_path / "second"
    applier = Applier(second)
    lists = 0

    async def barrier() -> int:
        applier.barrier()
        return applier.durable_seq

    async def control(obj: dict[str, object], body: bytes) -> tuple[dict[str, object], bytes]:
        nonlocal lists
        applier.barrier()
        if obj.get("op") == "list":
            lists += 1
            if lists == 1:
                return {"tree": {"x": "not a [mode, size, mtime]"}}, b""
            return {"tree": tree.list_tree(second)}, b""
        if obj.get("op") == "sig":
            return {}, D.signature_file(os.fsencode(second / str(obj["path"]))).encode()
        return {}, b""

    async def handler(conn: Conn) -> None:
        await SecondarySession(conn, applier.apply, barrier, control).run()

    svc = _service(tmp_path, site["node1"], port)
    (svc.backing / "x").write_bytes(b"x" * 100_000)

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(
                lambda task_status: serve(
                    addresses=["127.0.0.1"], port=port, peer="node1",
                    ctx=server_context(site["node2"]), key=KEY, handler=handler,
                    task_status=task_status,
                )
            )  # fmt: skip
            svc.primary.dirty = DirtyLog(svc.layout.dirty)
            svc.primary.dirty.open()
            svc.primary.activity = ActivityLog(svc.layout.activity)
            svc.primary.activity.open()
            n.start_soon(svc.primary.connect_loop)
            with trio.fail_after(20):
                while svc.status().state != "sync":
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()
        svc.primary.dirty.close()
        svc.primary.activity.close()

    trio.run(main)
    applier.close()
    assert lists >= 2
    assert svc.status().session_errors == 1
    assert (second / "x").read_bytes() == b"x" * 100_000
