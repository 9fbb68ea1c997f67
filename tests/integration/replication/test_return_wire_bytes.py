"""What a returning node costs on the wire: at most 1.1 x the bytes changed since.

The old primary wrote and fsync'd a 64 MiB file just before it crashed (its activity log
holds the whole file hot), the survivor changed 16 MiB of it, the old primary comes back:
before, the survivor sent about 80 MiB (the hot extents whole, then its own ranges). Then a
clean stop (drained: no logs) and the same change the other way. Counted as the bytes the
new primary's link sent (frames, before TLS) from its HELLO to in sync. Last, the old
primary rewrites 32 MiB of the existing file in place before it crashes (hot extents of a
file it did not create) and the survivor changes 16 MiB. Last, the survivor goes ALONE,
rewrites 16 MiB and crashes; the other node takes over on its own (split brain), rewrites
16 MiB elsewhere, and the first returns: a full checksum delta, 32 MiB differ.

Needs root and /dev/fuse (both available here and in CI)."""

from __future__ import annotations

import os
import random
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
FILE = 64 * MIB
CHANGED = 16 * MIB  # four 4 MiB regions of the file


def _change(path: Path, seed: int, regions: tuple[int, ...] = (1, 5, 9, 14)) -> None:
    """Rewrite 4 MiB regions of the file in place (16 MiB by default), fsync'd."""
    rnd = random.Random(seed)
    for region in regions:
        write_sync(path, rnd.randbytes(4 * MIB), region * 4 * MIB)


def test_a_returning_node_costs_the_changed_bytes_only(tmp_path: Path) -> None:  # noqa: PLR0915
    module, c1, c2 = configs(tmp_path)
    st = ReplicationSettings(port=free_tcp_port(), timeout_ms=1000, networks=("lan",),
                             site_key=b"k" * 48)  # fmt: skip
    app = tmp_path / "app"
    b1 = tmp_path / "node1/replica/demo/0"
    b2 = tmp_path / "node2/replica/demo/0"
    g1 = Generation().advance()
    for c in (c1, c2):
        GenerationStore(c.state_dir, module.name).save(GenRecord(g1))
    events: list[Event] = []
    figures: dict[str, int] = {}

    async def until(cond: Any, timeout: float = 60) -> None:
        with trio.fail_after(timeout):
            while not cond():
                await trio.sleep(0.05)

    async def io(fn: Any, *a: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *a)

    def synced(p: ReplicationService) -> bool:
        return p.status().state == "sync" and in_step(p)

    async def main() -> None:  # noqa: PLR0915 (one story, told in order)
        b1.mkdir(parents=True)
        b2.mkdir(parents=True)
        for b in (b1, b2):  # identical (empty) copies at g1, both know it
            (b.parent.parent / "demo.0.synced").write_text(f"{g1.current:016x}\n")

        # node1 primary in sync writes and fsyncs 64 MiB, then crashes (no drain)
        p1 = ReplicationService(module, c1, st, on_event=events.append)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                await n.start(ReplicationService(module, c2, st).run_secondary)
                await n.start(p1.run_primary)
                await until(lambda: synced(p1))
                await io(write_sync, app / "big", os.urandom(FILE))
                await until(lambda: in_step(p1))
                scope.cancel()
        assert (b2 / "big").stat().st_size == FILE

        # node2 takes over (a new generation), changes 16 MiB; node1 comes back
        g2 = g1.advance()
        GenerationStore(c2.state_dir, module.name).save(GenRecord(g2))
        p2 = ReplicationService(module, c2, st, on_event=events.append)
        async with trio.open_nursery() as n:
            await n.start(p2.run_primary)
            await io(_change, app / "big", 1)
            await n.start(ReplicationService(module, c1, st).run_secondary)
            await until(lambda: synced(p2))
            GenerationStore(c1.state_dir, module.name).save(GenRecord(g2))
            assert p2.primary.link is not None
            figures["crash_in_sync"] = p2.primary.link.conn.bytes_sent
            rep = await p2.verify()
            assert rep.equal, rep.differences
            # a clean stop: node2 drains, so node1 takes over knowing the copies identical
            assert await p2.drain(5.0)
            n.cancel_scope.cancel()
        assert (b1 / "big").read_bytes() == (b2 / "big").read_bytes()

        # (the manager's part: node1, in sync, adopted node2's generation; taking over, a new one)
        g3 = g2.advance()
        GenerationStore(c1.state_dir, module.name).save(GenRecord(g3))
        p1b = ReplicationService(module, c1, st, on_event=events.append)
        async with trio.open_nursery() as n:
            await n.start(p1b.run_primary)
            await io(_change, app / "big", 2)
            await n.start(ReplicationService(module, c2, st).run_secondary)
            await until(lambda: synced(p1b))
            GenerationStore(c2.state_dir, module.name).save(GenRecord(g3))
            assert p1b.primary.link is not None
            figures["clean_stop"] = p1b.primary.link.conn.bytes_sent
            rep = await p1b.verify()
            assert rep.equal, rep.differences
            # node1 rewrites 32 MiB of the file in place (hot extents, no new name: none
            # of it scoped by a name), in sync, then crashes
            await io(_change, app / "big", 3, (2, 3, 6, 7, 10, 11, 12, 13))
            await until(lambda: in_step(p1b))
            n.cancel_scope.cancel()

        g4 = g3.advance()
        GenerationStore(c2.state_dir, module.name).save(GenRecord(g4))
        p2b = ReplicationService(module, c2, st, on_event=events.append)
        async with trio.open_nursery() as n:
            await n.start(p2b.run_primary)
            await io(_change, app / "big", 5)
            sec_scope = trio.CancelScope()

            async def run_sec(task_status: trio.TaskStatus[None]) -> None:
                with sec_scope:
                    await ReplicationService(module, c1, st).run_secondary(task_status=task_status)

            await n.start(run_sec)
            await until(lambda: synced(p2b))
            assert p2b.primary.link is not None
            figures["crash_in_sync_rewrite"] = p2b.primary.link.conn.bytes_sent
            rep = await p2b.verify()
            assert rep.equal, rep.differences
            # the peer goes; node2, ALONE (a new generation), rewrites 16 MiB, then crashes
            sec_scope.cancel()
            GenerationStore(c2.state_dir, module.name).save(GenRecord(g4.advance()))
            await io(_change, app / "big", 6, (0, 4, 8, 12))
            await until(lambda: p2b.status().state == "alone")
            n.cancel_scope.cancel()
        full_before = sum(e.kind == "resync_full_needed" for e in events)

        # node1 takes over on its own (split brain: its generation moves apart) and rewrites
        # 16 MiB elsewhere; node2 returns: a full checksum delta (with quarantine), 32 MiB
        # differ between the copies
        GenerationStore(c1.state_dir, module.name).save(GenRecord(g4.advance()))
        p1c = ReplicationService(module, c1, st, on_event=events.append)
        async with trio.open_nursery() as n:
            await n.start(p1c.run_primary)
            await io(_change, app / "big", 7, (2, 6, 10, 14))
            await n.start(ReplicationService(module, c2, st).run_secondary)
            await until(lambda: synced(p1c), 120)
            assert p1c.primary.link is not None
            figures["crash_while_alone"] = p1c.primary.link.conn.bytes_sent
            rep = await p1c.verify()
            assert rep.equal, rep.differences
            n.cancel_scope.cancel()
        assert sum(e.kind == "resync_full_needed" for e in events) == full_before + 1

    trio.run(main)
    print(figures)
    full = [e for e in events if e.kind == "resync_full_needed"]
    assert len(full) == 1, full  # the split brain only
    for path, sent in figures.items():
        changed = 2 * CHANGED if path == "crash_while_alone" else CHANGED
        assert sent <= 1.1 * changed, (path, figures)
