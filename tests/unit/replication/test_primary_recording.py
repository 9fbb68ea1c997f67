"""The primary's Sink (``before``/``after``) records every change durably before it returns,
whatever moment the link is lost at. A real service, a real DirtyLog and ActivityLog on
disk, a real PrimaryLink over loopback TLS to a real secondary session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ha_runtime.replication import delta as D
from ha_runtime.replication import resync
from ha_runtime.replication import transport as T
from ha_runtime.replication.applier import Applier
from ha_runtime.replication.dirtylog import ActivityLog, DirtyLog
from ha_runtime.replication.journal import Op, Record, derive_key
from ha_runtime.replication.service import ReplicationService, ReplicationSettings
from tests.linkpair import connect_primary, serve_secondary
from tests.sitefactory import free_tcp_port, replication_cluster, replication_module

SITE_KEY = b"k" * 48
KEY = derive_key(SITE_KEY)


def _service(tmp: Path, tls: T.TlsFiles, port: int) -> ReplicationService:
    cluster = replication_cluster(tmp, "node1", tls)
    module = replication_module(tmp, cluster)
    st = ReplicationSettings(port=port, networks=("lan",), site_key=SITE_KEY)
    svc = ReplicationService(module, cluster, st)
    svc.backing.mkdir(parents=True)
    return svc


@asynccontextmanager
async def _in_sync(
    tmp: Path, site: dict[str, T.TlsFiles]
) -> AsyncIterator[tuple[ReplicationService, T.PrimaryLink]]:
    """A primary service in sync over a real link to a real secondary session."""
    port = free_tcp_port()
    applier = Applier(tmp / "second")

    async def barrier() -> int:
        applier.barrier()
        return applier.durable_seq

    async def control(obj: dict[str, object], body: bytes) -> tuple[dict[str, object], bytes]:
        return {}, b""

    async def handler(conn: T.Conn) -> None:
        await T.SecondarySession(conn, applier.apply, barrier, control).run()

    svc = _service(tmp, site["node1"], port)
    async with trio.open_nursery() as n:
        await serve_secondary(n, site["node2"], KEY, port, handler)
        conn = await connect_primary(site["node1"], KEY, port)
        link = T.PrimaryLink(conn, timeout=3)
        n.start_soon(link.run)
        svc._dirty = DirtyLog(svc.dirty_path)
        svc._dirty.open()
        svc._al = ActivityLog(svc.al_path)
        svc._al.open()
        svc._link = link
        svc._status.state = "sync"
        try:
            yield svc, link
        finally:
            svc._dirty.close()
            svc._al.close()
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
    tmp_path: Path, site: dict[str, T.TlsFiles]
) -> None:
    """The link is lost (a timeout, a reset) and the service has not gone ALONE yet (the
    connect loop runs later): the next operation is in the dirty log, durably, before it
    touches the backing directory."""

    async def main() -> None:
        async with _in_sync(tmp_path, site) as (svc, link):
            link.fail("connection reset")
            rec = Record(0, Op.WRITE, b"f", offset=0, data=b"x" * 4096)
            await svc.before(rec)
            assert svc._dirty is not None
            assert b"f" in _on_disk(svc.dirty_path), "performed with no record of it"
            assert _durable(svc._dirty)
            _write(svc, rec)
            svc.after(rec)
            assert _durable(svc._dirty)

    trio.run(main)


def test_a_write_whose_link_is_lost_before_it_is_shipped_is_durable_in_the_dirty_log(
    tmp_path: Path, site: dict[str, T.TlsFiles]
) -> None:
    """before() ran in sync (activity log), the link is lost, the operation is performed and
    cannot be shipped: after() returns only once the dirty log holds it durably (the activity
    log is emptied by the next resync before that log is synced otherwise)."""

    async def main() -> None:
        async with _in_sync(tmp_path, site) as (svc, link):
            rec = Record(0, Op.WRITE, b"g", offset=0, data=b"y" * 4096)
            await svc.before(rec)
            link.fail("no acknowledgement within 3 s")
            _write(svc, rec)
            svc.after(rec)
            assert svc._dirty is not None
            assert b"g" in _on_disk(svc.dirty_path)
            assert _durable(svc._dirty), "after() returned with the record not fsync'd"

    trio.run(main)


def test_a_namespace_change_after_the_link_was_lost_is_recorded(
    tmp_path: Path, site: dict[str, T.TlsFiles]
) -> None:
    async def main() -> None:
        async with _in_sync(tmp_path, site) as (svc, link):
            link.fail("connection reset")
            rec = Record(0, Op.MKDIR, b"d", mode=0o40755)
            await svc.before(rec)
            os.mkdir(svc.backing / "d")
            svc.after(rec)
            assert svc._dirty is not None
            assert b"d" in _on_disk(svc.dirty_path)
            assert _durable(svc._dirty)

    trio.run(main)


def test_an_unexpected_error_in_a_session_is_a_link_failure_not_an_exit(
    tmp_path: Path, site: dict[str, T.TlsFiles]
) -> None:
    """A session that fails on something unforeseen (here the peer's listing is malformed)
    ends that link only: the primary reconnects with backoff, counts it, and the next
    session brings the peer in sync. Before, the exception ended the primary's child and
    unmounted the application's directory under it."""
    port = free_tcp_port()
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
            return {"tree": resync.list_tree(second)}, b""
        if obj.get("op") == "sig":
            return {}, D.signature_file(os.fsencode(second / str(obj["path"]))).encode()
        return {}, b""

    async def handler(conn: T.Conn) -> None:
        await T.SecondarySession(conn, applier.apply, barrier, control).run()

    svc = _service(tmp_path, site["node1"], port)
    (svc.backing / "x").write_bytes(b"x" * 100_000)

    async def main() -> None:
        async with trio.open_nursery() as n:
            await serve_secondary(n, site["node2"], KEY, port, handler)
            svc._dirty = DirtyLog(svc.dirty_path)
            svc._dirty.open()
            svc._al = ActivityLog(svc.al_path)
            svc._al.open()
            n.start_soon(svc._connect_loop)
            with trio.fail_after(20):
                while svc.status().state != "sync":
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()
        svc._dirty.close()
        svc._al.close()

    trio.run(main)
    applier.close()
    assert lists >= 2
    assert svc.status().session_errors == 1
    assert (second / "x").read_bytes() == b"x" * 100_000
