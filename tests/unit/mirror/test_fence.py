"""The manager's side of fencing (docs/replication.md, *Fencing*), with a scripted child.

A real MirrorModule, a real ReplicationSupervisor and PeerTable; the replication child is a
small script speaking the child protocol (ha_runtime.replication.child), so the daemon side is
tested exactly on the messages it gets: a fresh status, then a fence request.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import trio

from ha_runtime.config import ScriptsSpec
from ha_runtime.events import EventLog
from ha_runtime.generation import Generation, GenRecord
from ha_runtime.heartbeat.packet import Heartbeat
from ha_runtime.heartbeat.peers import ModuleStream, PeerTable
from ha_runtime.mirror.module import MirrorModule
from ha_runtime.states import Flag, State
from tests.sitefactory import module_data, parsed_configs

TIMEOUT_S, INTERVAL_S = 1.0, 0.1

# The child: started, alone, asks for a fence (`declared`: the generation it declared the
# peer in sync at); reports the answer as a status.
CHILD = """
import json, sys
def send(o):
    sys.stdout.write(json.dumps(o) + "\\n"); sys.stdout.flush()
send({"type": "started"})
send({"type": "status", "status": {"state": "alone"}})
send({"type": "fence", "token": "t1", "declared": sys.argv[1]})
for line in sys.stdin:
    req = json.loads(line)
    if req.get("cmd") == "fenced":
        send({"type": "status", "status": {"state": "fenced " + req["token"]}})
"""


class NoVip:
    async def add(self, m: Any) -> None:
        return None

    async def remove(self, m: Any) -> None:
        return None

    def held(self, m: Any) -> bool | None:
        return None


async def _sent(_m: str) -> None:
    return None


def _manager(tmp: Path) -> MirrorModule:
    cluster, module = parsed_configs(
        tmp,
        module_data(
            "app", vip="10.77.0.200/24", interval_ms=int(INTERVAL_S * 1000),
            timeout_ms=int(TIMEOUT_S * 1000), replicated_dirs=[tmp / "app"],
        ),
    )  # fmt: skip
    module = dataclasses.replace(module, scripts=ScriptsSpec())
    table = PeerTable(
        {"app": ModuleStream("app", ("node2",), INTERVAL_S, TIMEOUT_S)}, time.monotonic
    )
    return MirrorModule(
        cluster=cluster, module=module, peers=table, events=EventLog(tmp / "events.jsonl"),
        send_now=_sent, vip_ops=NoVip(),
    )  # fmt: skip


def test_alone_with_a_peer_that_adopted_our_generation_takes_a_new_one_then_waits(
    tmp_path: Path,
) -> None:
    """ALONE, but the child had declared the peer in sync at the current generation (the
    peer adopted it; the manager had not yet gone PRIM): the fence takes a new generation
    (the old one in its history, the peer outdated) and answers only after the heartbeat
    timeout + one interval, since the peer, heard all along, could still take the old one
    for current until then."""
    mgr = _manager(tmp_path)
    g = Generation().advance()
    mgr.store.save(GenRecord(g, peer_outdated=True))
    mgr.record = GenRecord(g, peer_outdated=True)
    mgr.state = State.ALONE
    assert mgr.replication is not None
    mgr.replication.command = lambda role, i: [sys.executable, "-c", CHILD, f"{g.current:016x}"]
    mgr.replication.spares = None  # the scripted child has no spare form
    seq = iter(range(1, 1_000_000))

    def heard() -> None:
        mgr.peers.record(
            Heartbeat("node2", "app", "lan", State.SECOND, Flag.ELIGIBLE, 1, next(seq), g.current)
        )

    async def main() -> float:
        async with trio.open_nursery() as n:

            async def peer() -> None:
                while True:
                    heard()
                    await trio.sleep(INTERVAL_S)

            n.start_soon(peer)
            n.start_soon(mgr.run)
            await trio.sleep(0.2)
            assert mgr.replication is not None
            t0 = time.monotonic()
            await mgr.replication.start("primary")
            with trio.fail_after(10):
                while mgr.replication.children[0].status.get("state") != "fenced t1":
                    await trio.sleep(0.01)
            took = time.monotonic() - t0
            n.cancel_scope.cancel()
        return took

    took = trio.run(main)
    new = mgr.store.load()
    assert new.generation.current != g.current and g.current in new.generation.history, new
    assert new.peer_outdated
    assert took >= TIMEOUT_S + INTERVAL_S - 0.05, took
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert any(e.get("reason") == "peer fenced off" for e in events), events
