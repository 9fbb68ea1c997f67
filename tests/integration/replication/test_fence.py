"""An fsync that returns without the peer's acknowledgement is fenced (issue 14, item 4).

Two node daemons on loopback with a replicated directory (root + /dev/fuse), PRIM/SECOND in
sync. The secondary's replication child is frozen (SIGSTOP): the replication link is lost
while the heartbeats go on, as when the link carrying replication fails. An fsync on the
primary then waits for the peer, the link is declared lost, and the primary goes on alone.

At the instant that fsync returns, the secondary must no longer be able to take over on
its old copy if the primary died right then: its decision with the primary lost must not
be a primary state. Before the fix the fsync returned as soon as the link was declared
lost, before the primary's new data generation was even taken, and the secondary would have
gone ALONE on "same generation" without the acknowledged data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from test_daemon_replication import KEY, _site, _wait, _write_sync

from ha_runtime.config import load_site
from ha_runtime.generation import Relation
from ha_runtime.heartbeat.peers import PeerStatus
from ha_runtime.mirror.decision import decide
from ha_runtime.replication.child import mounted
from ha_runtime.states import State
from tests.sitefactory import free_port, free_tcp_port, pair_daemons

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="root+FUSE"),
]


def test_fsync_across_a_link_loss_returns_only_once_the_peer_is_fenced(tmp_path: Path) -> None:
    hb, rp = free_port(), free_tcp_port()
    holders: dict[str, str] = {}
    sites = [load_site(_site(tmp_path, n, hb, rp)) for n in ("node1", "node2")]
    d1, d2 = pair_daemons((sites[0], sites[1]), KEY, holders)
    m1, m2 = d1.modules["flightdata"], d2.modules["flightdata"]
    app1, app2 = tmp_path / "node1" / "app", tmp_path / "node2" / "app"
    back2 = tmp_path / "node2" / "state" / "replica" / "flightdata" / "0"
    seen: dict[str, Any] = {}

    def pair() -> bool:
        return (
            m1.state is State.PRIM and m2.state is State.SECOND and m2.status()["sync"] == "in-sync"
        )

    def verdict() -> dict[str, Any]:
        """What node2 would do if node1 died at this instant."""
        i = m2.inputs()
        d = decide(replace(i, peer=replace(i.peer, status=PeerStatus.LOST)))
        return {"relation": i.relation, "would_be": d.state, "reason": d.reason}

    def fsync_then_judge() -> None:
        t0 = time.monotonic()
        _write_sync(app1 / "alone.txt", b"acknowledged without the peer\n")
        seen["fsync_s"] = time.monotonic() - t0
        seen.update(trio.from_thread.run_sync(verdict))

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(d1.run)
            n.start_soon(d2.run)
            await _wait(pair)
            await trio.to_thread.run_sync(_write_sync, app1 / "before.txt", b"in sync\n")
            assert m2.replication is not None
            proc = m2.replication.children[0].proc
            assert proc is not None
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                await trio.to_thread.run_sync(fsync_then_judge)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            print(f"fsync across the link loss: {seen['fsync_s']:.2f} s; node2: {seen}")
            assert seen["relation"] is Relation.PEER_NEWER, seen
            assert not seen["would_be"].is_primary, seen
            # Back together: the fenced write reaches the peer with the resync.
            await _wait(pair, 60)
            assert (back2 / "alone.txt").read_bytes() == b"acknowledged without the peer\n"
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for p in (app1, app2):
            if mounted(p):
                subprocess.run(["umount", "-l", str(p)], check=False)


def test_first_fsync_after_a_failover_is_not_held_by_the_fence(tmp_path: Path) -> None:
    """Failover time is unchanged: node1's daemon dies, node2 takes over because its peer is
    lost, and its first fsyncs on the new mount return at local speed (a peer silent for a
    whole timeout when the generation was taken needs no wait)."""
    hb, rp = free_port(), free_tcp_port()
    holders: dict[str, str] = {}
    paths = [_site(tmp_path, n, hb, rp) for n in ("node1", "node2")]
    for path in paths:
        # A heartbeat timeout well above the time a takeover takes to mount: a fence wait
        # after the takeover would show in the first fsync.
        module = path.parent / "modules" / "flightdata.yml"
        text = module.read_text()
        module.write_text(text.replace("timeout_ms: 1000}", "timeout_ms: 3000}", 1))
    sites = [load_site(p) for p in paths]
    assert sites[0].modules[0].heartbeat.timeout_ms == 3000
    d1, d2 = pair_daemons((sites[0], sites[1]), KEY, holders)
    m1, m2 = d1.modules["flightdata"], d2.modules["flightdata"]
    app1, app2 = tmp_path / "node1" / "app", tmp_path / "node2" / "app"
    took: list[float] = []

    def fsyncs() -> None:
        for i in range(3):
            t0 = time.monotonic()
            _write_sync(app2 / f"after-failover-{i}.txt", b"x\n")
            took.append(time.monotonic() - t0)

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(d2.run)
            async with trio.open_nursery() as n1:
                n1.start_soon(d1.run)
                await _wait(lambda: m1.state is State.PRIM and m2.state is State.SECOND)
                await _wait(lambda: m2.status()["sync"] == "in-sync")
                n1.cancel_scope.cancel()  # node1's daemon is gone: no heartbeat any more
            holders.clear()  # and its VIP with it, as with a crashed server
            await _wait(lambda: m2.state is State.ALONE and mounted(app2), 30)
            await trio.to_thread.run_sync(fsyncs)
            print(f"first fsyncs after the failover: {[round(t, 3) for t in took]} s")
            assert max(took) < 0.5, took
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for p in (app1, app2):
            if mounted(p):
                subprocess.run(["umount", "-l", str(p)], check=False)
