"""An incremental resync completes while the application writes as fast as it can.

During a resync the application's operations are shipped too. An application that fsyncs
small records as fast as answered (the lab's demo application does) used to queue them
with no bound: its fsync waited for nothing on the peer, the link's queue grew to hundreds
of MiB, a keepalive's answer came later than the timeout, the link dropped, and the resync
started over, again and again. Now its operations wait for room on the link as in sync.

Two services on loopback, the primary's FUSE mount; needs root and /dev/fuse."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from fusepair import configs, in_step, write_sync

from ha_runtime.config import ReplicationSettings
from ha_runtime.generation import Generation, GenerationStore, GenRecord
from ha_runtime.replication.context import Event
from ha_runtime.replication.service import ReplicationService
from tests.sitefactory import free_tcp_port

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="root+FUSE"),
]

MIB = 1 << 20
INFLIGHT = 8 * MIB  # the link's allowance here (64 MiB by default)


def _flood(app: Path, stop: threading.Event, counts: list[int]) -> None:
    """The application: small records appended and fsync'd as fast as answered, a log
    rotated now and then."""
    fd = os.open(app / "records", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        n = 0
        while not stop.is_set():
            os.write(fd, b"record %08d " % n + b"x" * 80 + b"\n")
            os.fsync(fd)
            if n % 200 == 0:
                write_sync(app / "app.log", os.urandom(100_000))
                os.replace(app / "app.log", app / "app.log.1")
            n += 1
        counts.append(n)
    finally:
        os.close(fd)


def test_an_incremental_resync_completes_under_a_flood_of_small_fsyncs(tmp_path: Path) -> None:
    module, c1, c2 = configs(tmp_path)
    st = ReplicationSettings(port=free_tcp_port(), timeout_ms=1000, networks=("lan",),
                             site_key=b"k" * 48, max_inflight_bytes=INFLIGHT)  # fmt: skip
    app = tmp_path / "app"
    g1 = Generation().advance()
    for c in (c1, c2):
        GenerationStore(c.state_dir, module.name).save(GenRecord(g1))
    events: list[Event] = []
    peak = [0]

    async def until(cond: Any, timeout: float) -> None:
        with trio.fail_after(timeout):
            while not cond():
                peak[0] = max(peak[0], prim.status().inflight_bytes)
                await trio.sleep(0.02)

    prim = ReplicationService(module, c1, st, on_event=events.append)

    async def main() -> None:
        async with trio.open_nursery() as n:
            sec_scope = trio.CancelScope()

            async def run_sec(task_status: trio.TaskStatus[None]) -> None:
                with sec_scope:
                    await ReplicationService(module, c2, st).run_secondary(task_status=task_status)

            await n.start(run_sec)
            await n.start(prim.run_primary)
            await until(lambda: prim.status().state == "sync" and in_step(prim), 30)
            sec_scope.cancel()
            # the peer is away: 48 MiB to resync
            await trio.to_thread.run_sync(write_sync, app / "bulk", os.urandom(48 * MIB))
            await until(lambda: prim.status().state == "alone", 10)

            stop = threading.Event()
            counts: list[int] = []
            flood = threading.Thread(target=_flood, args=(app, stop, counts))
            flood.start()
            try:
                await trio.sleep(1)
                seen = len(events)
                await n.start(ReplicationService(module, c2, st).run_secondary)
                await until(lambda: any(e.kind == "resync_done" for e in events[seen:]), 60)
                await until(lambda: prim.status().state == "sync", 10)
                await trio.sleep(1)  # in sync, the application still at it
            finally:
                stop.set()
                await trio.to_thread.run_sync(flood.join)
            await until(lambda: in_step(prim), 10)
            # one attempt: the link never dropped, the resync never started over
            started = [e for e in events[seen:] if e.kind == "resync_started"]
            assert len(started) == 1, events[seen:]
            assert counts and counts[0] > 100, counts
            rep = await prim.verify()
            assert rep.equal, rep.differences
            n.cancel_scope.cancel()

    trio.run(main)
    # the queue stayed within the link's allowance (plus one resync window and a record)
    assert peak[0] <= INFLIGHT + 8 * MIB + MIB, peak
