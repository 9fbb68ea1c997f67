"""Heartbeats across restarts: the incarnation lives in state_dir, and so does replay memory.

Live services on loopback, restarted by building a new service on the same state_dir as a
restarted daemon would. The wall clock is a parameter of the service, so a clock that
steps back is injected, not patched in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import trio

from ha_runtime.generation import Generation
from ha_runtime.heartbeat.packet import decode
from ha_runtime.heartbeat.peers import LocalAnnounce, ModuleStream, PeerStatus
from ha_runtime.heartbeat.persisted import INCARNATION_FILE
from ha_runtime.heartbeat.service import HeartbeatService
from ha_runtime.states import Flag, State
from tests.sitefactory import free_port, wait

KEY = b"k" * 48
A_ADDR, B_ADDR = "127.0.0.2", "127.0.0.1"  # node2 sends, node1 receives
T0 = 1_764_000_000 * 10**9  # a wall clock reading in ns
HOUR_NS = 3600 * 10**9


def _service(
    node: str, state_dir: Path, port: int, wall: Callable[[], int] = lambda: T0
) -> HeartbeatService:
    me, peer = ("node2", "node1") if node == "node2" else ("node1", "node2")
    addr = {"node1": B_ADDR, "node2": A_ADDR}
    return HeartbeatService(
        node=me,
        key=KEY,
        port=port,
        bind={"lan": addr[me]},
        peers={peer: {"lan": addr[peer]}},
        streams={"flightdata": ModuleStream("flightdata", (peer,), 0.05, 0.6)},
        announce=lambda m: LocalAnnounce(State.PRIM, Flag.ELIGIBLE, Generation(5)),
        state_dir=state_dir,
        wall_clock_ns=wall,
    )


def _last_incarnation(rx: HeartbeatService) -> int | None:
    track = rx.table._tracks.get(("flightdata", "node2"))
    return None if track is None or track.last is None else track.last.incarnation


def test_captured_packet_is_refused_after_sender_and_receiver_restart(tmp_path: Path) -> None:
    port = free_port(host=B_ADDR)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            # A wire tap where node1 listens, before node1 runs: one genuine packet of A's
            # first incarnation.
            tap = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await tap.bind((B_ADDR, port))
            a1 = _service("node2", a_dir, port, wall=time.time_ns)
            a1_scope = trio.CancelScope()

            async def run_a1() -> None:
                with a1_scope:
                    await a1.run()

            nursery.start_soon(run_a1)
            captured, _ = await tap.recvfrom(2048)
            tap.close()
            old = decode(captured, KEY)
            assert not isinstance(old, str) and old.incarnation == a1.incarnation

            b1 = _service("node1", b_dir, port)
            b1_scope = trio.CancelScope()

            async def run_b1() -> None:
                with b1_scope:
                    await b1.run()

            nursery.start_soon(run_b1)
            await wait(lambda: _last_incarnation(b1) == a1.incarnation, what="node1 hears A1")
            a1_scope.cancel()
            a2 = _service("node2", a_dir, port, wall=time.time_ns)  # node2 restarts
            a2_scope = trio.CancelScope()

            async def run_a2() -> None:
                with a2_scope:
                    await a2.run()

            nursery.start_soon(run_a2)
            await wait(lambda: _last_incarnation(b1) == a2.incarnation, what="node1 hears A2")
            assert a2.incarnation > a1.incarnation
            a2_scope.cancel()  # node2 dies for good
            b1_scope.cancel()  # and node1 restarts
            await trio.sleep(0.1)
            b2 = _service("node1", b_dir, port)
            nursery.start_soon(b2.run)
            await b2.ready.wait()
            out = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await out.bind((A_ADDR, 0))
            await out.sendto(captured, (B_ADDR, port))  # the attacker replays the capture
            await wait(lambda: sum(b2.drops.values()) + sum(b2.received.values()) > 0, what="rx")
            out.close()
            assert b2.drops == {"replayed": 1}, (b2.drops, b2.received)
            # The dead node2 does not look alive to the restarted node1.
            assert b2.table.view("flightdata", "node2").status is not PeerStatus.ALIVE
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_wall_clock_stepping_back_does_not_make_a_restarted_sender_look_dead(
    tmp_path: Path,
) -> None:
    port = free_port(host=B_ADDR)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            b = _service("node1", b_dir, port)
            nursery.start_soon(b.run)
            await b.ready.wait()
            a1 = _service("node2", a_dir, port, wall=lambda: T0)
            a1_scope = trio.CancelScope()

            async def run_a1() -> None:
                with a1_scope:
                    await a1.run()

            nursery.start_soon(run_a1)
            await wait(lambda: _last_incarnation(b) == a1.incarnation, what="node1 hears A1")
            a1_scope.cancel()
            # node2 restarts after its clock was set back an hour (NTP step, RTC reset).
            a2 = _service("node2", a_dir, port, wall=lambda: T0 - HOUR_NS)
            nursery.start_soon(a2.run)
            await wait(lambda: _last_incarnation(b) == a2.incarnation, what="node1 hears A2")
            await trio.sleep(0.7)  # longer than the timeout: alive on A2's packets alone
            assert b.table.view("flightdata", "node2").status is PeerStatus.ALIVE
            assert "replayed" not in b.drops, b.drops
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_incarnation_is_saved_before_the_first_heartbeat_and_grows(tmp_path: Path) -> None:
    port = free_port(host=B_ADDR)
    path = tmp_path / INCARNATION_FILE

    async def start(wall: int) -> int:
        svc = _service("node2", tmp_path, port, wall=lambda: wall)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc.run)
            await svc.ready.wait()  # sockets bound: the next step is the first send
            assert path.read_text() == f"{svc.incarnation}\n"
            nursery.cancel_scope.cancel()
        return svc.incarnation

    assert not path.exists()
    assert trio.run(start, T0) == T0  # first start: the wall clock
    assert trio.run(start, T0 - HOUR_NS) == T0 + 1  # clock stepped back: the counter
    assert trio.run(start, T0 - HOUR_NS) == T0 + 2
    assert trio.run(start, T0 + HOUR_NS) == T0 + HOUR_NS  # clock ahead again
    path.write_text("garbage\n")  # damaged: the wall clock still orders restarts
    assert trio.run(start, T0 + 2 * HOUR_NS) == T0 + 2 * HOUR_NS
    assert path.read_text() == f"{T0 + 2 * HOUR_NS}\n"
