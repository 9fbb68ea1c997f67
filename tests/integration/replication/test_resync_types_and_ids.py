"""Through the FUSE mount (root, /dev/fuse): names changing type while the peer is away
resync incrementally (they livelocked the resync), owner ids of all 32 bits replicate (ids
>= 2**31 did not pack), and incremental resyncs the peer keeps refusing fall back to a
full one, loudly."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
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

BIG_UID = 3_000_000_000
TOP_UID = 0xFFFFFFFE  # the largest id (0xFFFFFFFF is "unchanged")


async def _until(cond: Any, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.05)


async def _io(fn: Any, *a: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *a)


def _change_types(app: Path) -> None:
    """On the primary while the peer is away: every name changes type."""
    os.rmdir(app / "x")
    (app / "x").write_bytes(b"a file where a tree was")
    os.unlink(app / "y")
    (app / "y").mkdir()
    (app / "y/in").write_bytes(b"in a directory where a file was")
    os.unlink(app / "z")
    os.symlink("../elsewhere", app / "z")
    os.unlink(app / "w")
    os.mkfifo(app / "w")
    os.chown(app / "owned", TOP_UID, BIG_UID)


def _same_generation(module: Any, *clusters: Any) -> None:
    """As the manager leaves them: both nodes at one generation (a return resyncs
    incrementally, not as a first synchronisation)."""
    g1 = Generation().advance()
    for c in clusters:
        GenerationStore(c.state_dir, module.name).save(GenRecord(g1))


def _diverge(b2: Path, outside: Path) -> None:
    """The peer's x holds a tree its dirty log knows nothing of (a symlink out of the copy
    in it): removed with x, never followed."""
    (b2 / "x/sub/deeper").mkdir(parents=True)
    (b2 / "x/sub/deeper/f").write_bytes(b"deep")
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    (b2 / "x/sub/out").symlink_to(outside)


def _before(app: Path) -> None:
    (app / "x").mkdir()
    (app / "y").write_bytes(b"file y")
    (app / "z").write_bytes(b"file z")
    os.symlink("y", app / "w")
    (app / "owned").write_bytes(b"o")


@dataclass
class _Pair:
    """node1 primary (its events recorded) and node2 secondary of module demo on loopback,
    both at one generation; app is node1's mounted directory, b2 node2's copy."""

    module: Any
    c2: Any
    st: ReplicationSettings
    prim: ReplicationService
    events: list[Event]
    app: Path
    b2: Path

    @classmethod
    def of(cls, tmp: Path) -> _Pair:
        module, c1, c2 = configs(tmp)
        _same_generation(module, c1, c2)
        st = ReplicationSettings(
            port=free_tcp_port(), timeout_ms=1000, networks=("lan",), site_key=b"k" * 48
        )
        events: list[Event] = []
        prim = ReplicationService(module, c1, st, on_event=events.append)
        return cls(module, c2, st, prim, events, tmp / "app", tmp / "node2/replica/demo/0")

    def secondary(self) -> ReplicationService:
        return ReplicationService(self.module, self.c2, self.st)

    async def start_in_sync(self, n: trio.Nursery) -> trio.CancelScope:
        """Start the secondary (stopped by cancelling the scope returned) and the primary,
        and wait until they are in sync."""
        sec_scope = trio.CancelScope()

        async def run_sec() -> None:
            with sec_scope:
                await self.secondary().run_secondary()

        n.start_soon(run_sec)
        await n.start(self.prim.run_primary)
        await _until(lambda: self.prim.status().state == "sync" and in_step(self.prim))
        return sec_scope


def test_type_changes_resync_incrementally_and_all_ids_replicate(tmp_path: Path) -> None:
    pair = _Pair.of(tmp_path)
    prim, events, app, b2 = pair.prim, pair.events, pair.app, pair.b2

    async def main() -> None:
        async with trio.open_nursery() as n:
            sec_scope = await pair.start_in_sync(n)
            # in sync: an id above 2**31 is replicated with the operation
            await _io(write_sync, app / "big", b"b")
            await _io(os.chown, app / "big", BIG_UID, BIG_UID + 1)
            await _io(write_sync, app / "big", b"B")
            assert (b2 / "big").stat().st_uid == BIG_UID
            assert (b2 / "big").stat().st_gid == BIG_UID + 1
            await _io(_before, app)
            await _io(write_sync, app / "sync", b"s")
            assert (b2 / "x").is_dir()

            sec_scope.cancel()
            await _io(write_sync, app / "after", b"a")
            await _until(lambda: prim.status().state == "alone")
            await _io(_change_types, app)
            _diverge(b2, tmp_path / "outside")

            seen = len(events)
            n.start_soon(pair.secondary().run_secondary)
            await _until(lambda: any(e.kind == "resync_done" for e in events[seen:]))
            done = next(e for e in events[seen:] if e.kind == "resync_done")
            assert done.detail["kind"] == "incremental"
            assert [e.detail for e in events[seen:] if e.kind == "resync_full_needed"] == []
            # at the first attempt: none refused (no fallback to a full resync either)
            assert [e.detail for e in events[seen:] if e.kind == "resync_started"] == [
                {"full": False}
            ]
            rep = await prim.verify()
            assert rep.equal, rep.differences
            n.cancel_scope.cancel()

    trio.run(main)
    assert (b2 / "x").read_bytes() == b"a file where a tree was"
    assert sorted(os.listdir(tmp_path / "outside")) == ["keep"]
    assert (b2 / "y/in").exists()
    assert os.readlink(b2 / "z") == "../elsewhere"
    assert (b2 / "w").is_fifo()
    st_o = (b2 / "owned").stat()
    assert (st_o.st_uid, st_o.st_gid) == (TOP_UID, BIG_UID)


def _chattr(flag: str, p: Path) -> None:
    subprocess.run(["chattr", flag, str(p)], check=True, capture_output=True)


def test_incremental_resyncs_the_peer_keeps_refusing_fall_back_to_a_full_one(
    tmp_path: Path,
) -> None:
    """The secondary's copy of a file is immutable (a difference the dirty log knows
    nothing of): every incremental resync is refused on it. After three in a row the next
    is full (event resync_fallback_full); once the file is writable again it completes."""
    pair = _Pair.of(tmp_path)
    prim, events, app, b2 = pair.prim, pair.events, pair.app, pair.b2

    async def main() -> None:
        async with trio.open_nursery() as n:
            sec_scope = await pair.start_in_sync(n)
            await _io(write_sync, app / "f", b"v1" * 1000)
            sec_scope.cancel()
            await _io(write_sync, app / "g", b"g")
            await _until(lambda: prim.status().state == "alone")
            await _io(write_sync, app / "f", b"v2" * 1000)
            _chattr("+i", b2 / "f")
            seen = len(events)
            try:
                n.start_soon(pair.secondary().run_secondary)
                await _until(
                    lambda: any(e.kind == "resync_fallback_full" for e in events[seen:]), 30
                )
                fb = next(i for i, e in enumerate(events) if e.kind == "resync_fallback_full")
                starts = [e for e in events[seen:fb] if e.kind == "resync_started"]
                assert len(starts) == 3 and not any(e.detail["full"] for e in starts)
                await _until(
                    lambda: any(
                        e.kind == "resync_started" and e.detail["full"] for e in events[fb:]
                    )
                )
            finally:
                _chattr("-i", b2 / "f")
            await _until(lambda: any(e.kind == "resync_done" for e in events[seen:]), 30)
            await _until(lambda: prim.status().state == "sync")
            rep = await prim.verify()
            assert rep.equal, rep.differences
            n.cancel_scope.cancel()

    trio.run(main)
    assert (b2 / "f").read_bytes() == b"v2" * 1000
