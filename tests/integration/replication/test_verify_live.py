"""`verify` while the application writes: no false difference, and a real one is reported.

The first pass digests the two copies a moment apart, so a file being written differs; the
final pass re-digests only those paths with mutating operations held at one journal
position. A file changed behind the replicator's back on the secondary still differs.
Needs root and /dev/fuse (both available here and in CI).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from fusepair import configs, write_sync

from ha_runtime.config import ReplicationSettings
from ha_runtime.replication.service import ReplicationService
from tests.sitefactory import free_tcp_port

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="root+FUSE"),
]


def test_verify_while_writing_then_a_real_difference(tmp_path: Path) -> None:
    module, c1, c2 = configs(tmp_path)
    st = ReplicationSettings(
        port=free_tcp_port(), timeout_ms=2000, networks=("lan",), site_key=b"k" * 48
    )
    prim = ReplicationService(module, c1, st)
    app = tmp_path / "app"
    b2 = tmp_path / "node2/replica/demo/0"
    stop = threading.Event()
    writes = [0]

    def writer() -> None:
        # Appends and rewrites a 2 MiB file as fast as it can, fsync every 16 writes.
        fd = os.open(app / "live.db", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while not stop.is_set():
                os.pwrite(fd, os.urandom(65536), (writes[0] % 32) * 65536)
                writes[0] += 1
                if writes[0] % 16 == 0:
                    os.fsync(fd)
        finally:
            os.close(fd)

    async def main() -> None:
        async with trio.open_nursery() as n:
            sec = ReplicationService(module, c2, st)
            n.start_soon(sec.run_secondary)
            await n.start(prim.run_primary)
            with trio.fail_after(15):
                while prim.status().state != "sync":
                    await trio.sleep(0.05)
            await trio.to_thread.run_sync(write_sync, app / "still", b"s" * 300_000)
            thread = threading.Thread(target=writer)
            thread.start()
            try:
                with trio.fail_after(15):
                    while writes[0] < 16:  # the writer is running (and has fsync'd once)
                        await trio.sleep(0.01)
                during = 0
                for _ in range(5):
                    before = writes[0]
                    rep = await prim.verify()
                    assert rep.equal, rep.differences
                    during += writes[0] - before
                # The application kept writing while verifies ran. Not asserted per verify:
                # one that finds nothing to compare twice may end before the next write.
                assert during > 0
            finally:
                stop.set()
                await trio.to_thread.run_sync(thread.join)
            # A change behind the replicator's back on the secondary is a real difference.
            with open(b2 / "still", "r+b") as f:
                f.write(b"X")
            rep: Any = await prim.verify()
            assert not rep.equal
            assert len(rep.differences) == 1 and rep.differences[0].startswith("still: primary f:")
            n.cancel_scope.cancel()

    trio.run(main)


def test_a_digest_longer_than_the_link_timeout_keeps_the_link(tmp_path: Path) -> None:
    """The secondary answers keepalives while it digests (or signs) a large tree."""
    module, c1, c2 = configs(tmp_path)
    st = ReplicationSettings(
        port=free_tcp_port(), timeout_ms=300, networks=("lan",), site_key=b"k" * 48
    )
    events: list[Any] = []
    prim = ReplicationService(module, c1, st, on_event=events.append)

    def big() -> None:
        # The same 640 MiB in both copies, put there behind the replicator: only the
        # digest is slow, no replicated write is in flight.
        chunk = os.urandom(1 << 20)
        for node in ("node1", "node2"):
            with open(tmp_path / node / "replica/demo/0/big", "wb") as f:
                for i in range(640):
                    f.write(chunk[i % 7 :] + chunk[: i % 7])

    async def main() -> None:
        async with trio.open_nursery() as n:
            sec = ReplicationService(module, c2, st)
            n.start_soon(sec.run_secondary)
            await n.start(prim.run_primary)
            with trio.fail_after(15):
                while prim.status().state != "sync":
                    await trio.sleep(0.05)
            await trio.to_thread.run_sync(big)
            lost = sum(1 for e in events if e.kind == "peer_lost")
            started = trio.current_time()
            rep = await prim.verify()
            assert rep.equal, rep.differences
            assert trio.current_time() - started > st.timeout_s  # longer than the timeout
            assert sum(1 for e in events if e.kind == "peer_lost") == lost
            assert prim.status().state == "sync"
            n.cancel_scope.cancel()

    trio.run(main)
