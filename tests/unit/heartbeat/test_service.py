"""Heartbeat codec and a live receiver on loopback fed with forged and replayed packets."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.generation import Generation
from ha_runtime.heartbeat.packet import MAX_PACKET, Drop, Heartbeat, ReplayGuard, decode, encode
from ha_runtime.heartbeat.peers import LocalAnnounce, ModuleStream, PeerStatus
from ha_runtime.heartbeat.service import HeartbeatService
from ha_runtime.states import Flag, State
from tests.sitefactory import free_port

KEY = b"k" * 48
HB = Heartbeat("node2", "flightdata", "lan", State.PRIM, Flag.ELIGIBLE, 7, 1, 0x42, (1, 2))


def test_roundtrip() -> None:
    assert decode(encode(HB, KEY), KEY) == HB


def test_drop_reasons() -> None:
    good = encode(HB, KEY)
    assert decode(good, b"x" * 48) is Drop.FORGED
    flipped = bytearray(good)
    flipped[20] ^= 1
    assert decode(bytes(flipped), KEY) is Drop.FORGED
    assert decode(good[:10], KEY) is Drop.TRUNCATED
    assert decode(good[:-1], KEY) is Drop.TRUNCATED
    assert decode(good + b"x", KEY) is Drop.MALFORMED
    assert decode(b"x" * (MAX_PACKET + 1), KEY) is Drop.OVERSIZED
    assert decode(b"NOPE" + good[4:], KEY) is Drop.MALFORMED


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_garbage_never_raises(data: bytes) -> None:
    assert isinstance(decode(data, KEY), Drop)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.text(min_size=1, max_size=30))
def test_roundtrip_fields(inc: int, seq: int, node: str) -> None:
    hb = replace(HB, incarnation=inc, seq=seq, node=node)
    assert decode(encode(hb, KEY), KEY) == hb


def test_replay_guard_orders_per_network() -> None:
    g = ReplayGuard()
    assert g.accept(HB)
    assert not g.accept(HB)
    assert g.accept(replace(HB, network="hb"))  # same seq on another network is legitimate
    assert g.accept(replace(HB, seq=2))
    assert not g.accept(replace(HB, seq=1))
    assert g.accept(replace(HB, incarnation=8, seq=1))  # peer rebooted
    assert not g.accept(replace(HB, incarnation=7, seq=99))  # old boot's packets stay dead


def _service(
    node: str,
    addr: str,
    peer: str,
    peer_addr: str,
    port: int,
    *,
    state_dir: Path,
    timeout_s: float = 0.6,
) -> HeartbeatService:
    return HeartbeatService(
        state_dir=state_dir / node,
        node=node,
        key=KEY,
        port=port,
        bind={"lan": addr},
        peers={peer: {"lan": peer_addr}},
        streams={"flightdata": ModuleStream("flightdata", (peer,), 0.05, timeout_s)},
        announce=lambda m: LocalAnnounce(State.SECOND, Flag.ELIGIBLE, Generation(5)),
    )


def test_live_receiver_counts_and_ignores_forged_and_replayed(tmp_path: Path) -> None:
    port = free_port()

    async def main() -> None:
        rx = _service("node1", "127.0.0.1", "node2", "127.0.0.2", port, state_dir=tmp_path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rx.run)
            await rx.ready.wait()
            out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            out.bind(("127.0.0.2", 0))
            dest = ("127.0.0.1", port)
            genuine = replace(HB, node="node2", seq=10, state=State.PRIM)
            out.sendto(encode(genuine, KEY), dest)
            out.sendto(encode(genuine, KEY), dest)  # replayed
            out.sendto(encode(replace(genuine, seq=5), KEY), dest)  # older: replayed
            forged = replace(genuine, seq=11, state=State.STOP)
            out.sendto(encode(forged, b"attacker-key" * 4), dest)  # forged
            out.sendto(encode(replace(genuine, seq=12, network="hb"), KEY), dest)  # wrong network
            out.sendto(encode(replace(genuine, seq=13, module="nope"), KEY), dest)
            out.sendto(encode(replace(genuine, seq=14, node="mallory"), KEY), dest)
            out.sendto(b"\x00" * 3, dest)
            out.sendto(b"\x00" * 1500, dest)
            out.close()
            with trio.fail_after(5):
                while sum(rx.drops.values()) < 8:
                    await trio.sleep(0.01)
            assert rx.drops == {
                "replayed": 2,
                "forged": 1,
                "wrong_network": 1,
                "unknown_module": 1,
                "unknown_node": 1,
                "truncated": 1,
                "oversized": 1,
            }
            # Only the genuine packet was taken: the forged STOP did not change the view.
            view = rx.table.view("flightdata", "node2")
            assert view.status is PeerStatus.ALIVE and view.state is State.PRIM
            assert view.generation.current == genuine.generation
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_two_live_services_see_each_other_then_lose(tmp_path: Path) -> None:
    port = free_port()

    async def main() -> None:
        a = _service(
            "node1", "127.0.0.1", "node2", "127.0.0.2", port, state_dir=tmp_path, timeout_s=0.3
        )
        b = _service(
            "node2", "127.0.0.2", "node1", "127.0.0.1", port, state_dir=tmp_path, timeout_s=0.3
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run)
            async with trio.open_nursery() as inner:
                inner.start_soon(b.run)
                with trio.fail_after(5):
                    while a.table.view("flightdata", "node2").status is not PeerStatus.ALIVE:
                        await trio.sleep(0.02)
                assert b.table.view("flightdata", "node1").status is PeerStatus.ALIVE
                inner.cancel_scope.cancel()  # node2 dies
            with trio.fail_after(5):
                while a.table.view("flightdata", "node2").status is not PeerStatus.LOST:
                    await trio.sleep(0.02)
            assert sum(a.drops.values()) == 0
            nursery.cancel_scope.cancel()

    trio.run(main)
