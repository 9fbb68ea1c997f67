"""FUSE mount on this host replicating over TLS on loopback to a second backing directory.

Needs root and /dev/fuse (both available here and in CI)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
from fusepair import FUSE_ROOT, configs, in_step, write_sync

from ha_runtime.config import ReplicationSettings
from ha_runtime.generation import Generation, GenerationStore, GenRecord
from ha_runtime.replication.context import Event
from ha_runtime.replication.service import ReplicationService
from tests.sitefactory import free_tcp_port

pytestmark = FUSE_ROOT


def test_mount_replicate_lose_peer_resync(tmp_path: Path) -> None:  # noqa: PLR0915
    module, c1, c2 = configs(tmp_path)
    port = free_tcp_port()
    st = ReplicationSettings(port=port, timeout_ms=1000, networks=("lan",), site_key=b"k" * 48)
    events: list[Event] = []
    prim = ReplicationService(module, c1, st, on_event=events.append)
    app = tmp_path / "app"
    b1 = tmp_path / "node1/replica/demo/0"
    b2 = tmp_path / "node2/replica/demo/0"
    # Both copies at one data generation (the manager's part): the first sync is a full
    # one (never identical before), the return after the peer was lost an incremental one.
    g1 = Generation().advance()
    for c in (c1, c2):
        GenerationStore(c.state_dir, module.name).save(GenRecord(g1))

    async def until(cond: Any, timeout: float = 15) -> None:
        with trio.fail_after(timeout):
            while not cond():
                await trio.sleep(0.05)

    async def io(fn: Any, *a: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *a)

    async def main() -> None:
        async with trio.open_nursery() as n:
            # existing data on the primary before the first sync (full resync)
            b1.mkdir(parents=True)
            (b1 / "old.bin").write_bytes(os.urandom(300_000))
            sec = ReplicationService(module, c2, st)
            sec_scope = trio.CancelScope()

            async def run_sec() -> None:
                with sec_scope:
                    await sec.run_secondary()

            n.start_soon(run_sec)
            await n.start(prim.run_primary)
            # "sync" starts with the resync's final barrier, before the peer acknowledged it
            await until(lambda: prim.status().state == "sync" and in_step(prim))
            assert (b2 / "old.bin").read_bytes() == (b1 / "old.bin").read_bytes()
            # Both ends of this version: the primary's frames travel untagged (version 3).
            assert prim.primary.link is not None and prim.primary.link.untagged

            # fsync semantics: when fsync returns, the secondary has the bytes durably
            await io(write_sync, app / "db", b"A" * 10_000)
            assert (b2 / "db").read_bytes() == b"A" * 10_000
            await io(os.mkdir, app / "d")
            await io(os.rename, app / "db", app / "d" / "db")
            await io(write_sync, app / "d" / "db", b"B" * 100, 5000)
            assert (b2 / "d/db").read_bytes()[5000:5100] == b"B" * 100
            await io(os.symlink, "d/db", app / "link")
            await io(os.chmod, app / "d", 0o700)
            await io(os.unlink, app / "old.bin")
            await io(write_sync, app / "t", b"x")
            rep = await prim.verify()
            assert rep.equal, rep.differences

            # the peer dies: the primary goes ALONE within the timeout and records ranges
            sec_scope.cancel()
            with trio.fail_after(5):
                await io(write_sync, app / "d" / "db", b"C" * 4096, 8192)
            await until(lambda: prim.status().state == "alone")
            await io(write_sync, app / "new", os.urandom(50_000))
            await io(os.rename, app / "t", app / "t2")
            assert any(e.kind == "peer_lost" for e in events)
            s = prim.status()
            assert s.dirty_paths >= 2 and s.dirty_bytes >= 4096
            assert (tmp_path / "node1/replica/demo.0.dirty").stat().st_size > 0

            # the peer comes back: incremental resync of what changed, then sync again
            seen = len(events)
            sec2 = ReplicationService(module, c2, st)
            n.start_soon(sec2.run_secondary)
            await until(lambda: any(e.kind == "resync_done" for e in events[seen:]))
            await until(lambda: prim.status().state == "sync")
            done = [e for e in events if e.kind == "resync_done"][-1]
            assert done.detail["kind"] == "incremental"
            assert done.detail["bytes_done"] <= 4096 + 50_000 + 16_384
            # Where its end went: queuing, the peer's final barrier, the declaration.
            assert done.detail["queued_s"] >= 0
            assert done.detail["barrier_s"] >= 0
            assert done.detail["declare_s"] >= 0
            rep = await prim.verify()
            assert rep.equal, rep.differences
            assert prim.status().dirty_paths == 0
            n.cancel_scope.cancel()

    trio.run(main)
    assert not os.path.ismount(app)


def test_a_secondary_that_does_not_read_untagged_frames_gets_tagged_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upgrade in either order: a secondary that does not answer the HELLO's offer (an older
    version ignores it) keeps receiving version 2 frames, and replication works."""
    module, c1, c2 = configs(tmp_path)
    st = ReplicationSettings(
        port=free_tcp_port(), timeout_ms=1000, networks=("lan",), site_key=b"k" * 48
    )
    prim = ReplicationService(module, c1, st)
    sec = ReplicationService(module, c2, st)
    original = sec.secondary.control

    async def older(applier: Any, obj: dict[str, Any]) -> Any:
        obj.pop("untagged", None)
        return await original(applier, obj)

    monkeypatch.setattr(sec.secondary, "control", older)
    b2 = tmp_path / "node2/replica/demo/0"

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(sec.run_secondary)
            await n.start(prim.run_primary)
            with trio.fail_after(15):
                while not (prim.status().state == "sync" and in_step(prim)):
                    await trio.sleep(0.05)
            assert prim.primary.link is not None and not prim.primary.link.untagged
            data = os.urandom(3 << 20)
            await trio.to_thread.run_sync(write_sync, tmp_path / "app" / "f", data)
            assert (b2 / "f").read_bytes() == data
            assert not prim.status().rejected and not sec.status().rejected
            n.cancel_scope.cancel()

    trio.run(main)
