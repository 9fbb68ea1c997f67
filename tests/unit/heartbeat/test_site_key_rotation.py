"""Site key rotation: heartbeats made with the site key stay authentic across the change.

The rotation (playbooks/rotate_secrets.yml -e rotate_site_key=true) restarts one node at a
time, so for a while a node that signs with the old key meets one that signs with the new
key. Each accepts the other key (`site.key.next` before its switch, `site.key.previous`
after): neither may look dead to the other. A packet made with any third key is still
dropped as forged, and each packet taken with the accepted key is counted.
Pair keys are left out here: the site key is what peers without one use.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from ha_runtime.generation import Generation
from ha_runtime.heartbeat.packet import Drop, Heartbeat, encode
from ha_runtime.heartbeat.peers import LocalAnnounce, ModuleStream, PeerStatus
from ha_runtime.heartbeat.service import HeartbeatService
from ha_runtime.security import InsecureFile, key_id, read_site_keys
from ha_runtime.states import Flag, State
from tests.sitefactory import free_port, wait

OLD, NEW, THIRD = b"o" * 48, b"n" * 48, b"t" * 48
ADDR = {"node1": "127.0.0.1", "node2": "127.0.0.2"}
MODULE = "flightdata"


def _service(
    node: str, port: int, tmp: Path, key: bytes, accepted: tuple[bytes, ...]
) -> HeartbeatService:
    peer = next(n for n in ADDR if n != node)
    return HeartbeatService(
        node=node,
        key=key,
        accepted_keys=accepted,
        port=port,
        bind={"lan": ADDR[node]},
        peers={peer: {"lan": ADDR[peer]}},
        streams={MODULE: ModuleStream(MODULE, (peer,), 0.05, 0.6)},
        announce=lambda m: LocalAnnounce(State.SECOND, Flag.ELIGIBLE, Generation(5)),
        state_dir=tmp / node,
    )


def _from_node1(seq: int, key: bytes) -> bytes:
    hb = Heartbeat("node1", MODULE, "lan", State.PRIM, Flag.ELIGIBLE, 7, seq, 5)
    return encode(hb, key)


def _alive(rx: HeartbeatService, peer: str) -> bool:
    return rx.table.view(MODULE, peer).status is PeerStatus.ALIVE


def test_a_packet_of_the_accepted_key_is_taken_and_counted(tmp_path: Path) -> None:
    rx = _service("node2", free_port(), tmp_path, NEW, (OLD,))
    assert isinstance(rx.handle_datagram("lan", _from_node1(1, NEW)), Heartbeat)
    assert rx.accepted_key_packets == 0  # the current key: not counted
    assert isinstance(rx.handle_datagram("lan", _from_node1(2, OLD)), Heartbeat)
    assert rx.accepted_key_packets == 1
    # A replayed copy made with the accepted key is refused and not counted again.
    assert rx.handle_datagram("lan", _from_node1(2, OLD)) is Drop.REPLAYED
    assert rx.accepted_key_packets == 1
    assert rx.drops == {"replayed": 1}


def test_a_third_key_is_still_forged(tmp_path: Path) -> None:
    rx = _service("node2", free_port(), tmp_path, NEW, (OLD,))
    assert rx.handle_datagram("lan", _from_node1(1, THIRD)) is Drop.FORGED
    assert rx.drops == {"forged": 1}
    assert rx.accepted_key_packets == 0
    assert rx.table.view(MODULE, "node1").status is not PeerStatus.ALIVE
    # And with no rotation under way, the old key is a third key like any other.
    after = _service("node2", free_port(), tmp_path, NEW, ())
    assert after.handle_datagram("lan", _from_node1(1, OLD)) is Drop.FORGED
    assert after.drops == {"forged": 1}


@pytest.mark.parametrize(
    ("keys1", "keys2"),
    [
        # phase 1 done on node1 only: both sign with the old key
        ((OLD, (NEW,)), (OLD, ())),
        # phase 2 on node1 only: node1 signs with the new key, node2 still the old one
        ((NEW, (OLD,)), (OLD, (NEW,))),
        # phase 3 on node1 only: node1 dropped the old key, node2 signs with the new one
        ((NEW, ()), (NEW, (OLD,))),
    ],
    ids=["accept", "switch", "drop"],
)
def test_two_nodes_one_phase_apart_stay_alive(
    tmp_path: Path, keys1: tuple[bytes, tuple[bytes, ...]], keys2: tuple[bytes, tuple[bytes, ...]]
) -> None:
    port = free_port()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            n1 = _service("node1", port, tmp_path, *keys1)
            n2 = _service("node2", port, tmp_path, *keys2)
            nursery.start_soon(n1.run)
            nursery.start_soon(n2.run)
            await wait(lambda: _alive(n1, "node2") and _alive(n2, "node1"), what="pair alive")
            await trio.sleep(0.7)  # past the timeout: alive on what is accepted
            assert _alive(n1, "node2") and _alive(n2, "node1")
            assert "forged" not in n1.drops and "forged" not in n2.drops
            # The node whose peer signs with its accepted key counts what it took.
            for rx, tx in ((n1, keys2), (n2, keys1)):
                own = keys1 if rx is n1 else keys2
                assert (rx.accepted_key_packets > 0) == (tx[0] != own[0])
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_two_nodes_two_phases_apart_do_not_hear_each_other(tmp_path: Path) -> None:
    # Why the playbook finishes each phase on every node before the next: a node that
    # dropped the old key and one that never accepted the new one cannot authenticate.
    port = free_port()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            n1 = _service("node1", port, tmp_path, NEW, ())
            n2 = _service("node2", port, tmp_path, OLD, ())
            nursery.start_soon(n1.run)
            nursery.start_soon(n2.run)
            await wait(lambda: n1.drops["forged"] > 3 and n2.drops["forged"] > 3, what="drops")
            assert not _alive(n1, "node2") and not _alive(n2, "node1")
            nursery.cancel_scope.cancel()

    trio.run(main)


def _key_file(path: Path, key: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(key + b"\n")
    os.chmod(path, mode)
    return path


def test_the_daemon_reads_the_accepted_keys_beside_the_site_key(tmp_path: Path) -> None:
    site = _key_file(tmp_path / "site.key", NEW)
    assert read_site_keys(site).accepted == ()
    _key_file(tmp_path / "site.key.previous", OLD)
    keys = read_site_keys(site)
    assert (keys.current, keys.accepted) == (NEW, (OLD,))
    assert keys.ids() == {"current": key_id(NEW), "accepted": [key_id(OLD)]}
    assert OLD not in repr(keys).encode() and NEW not in repr(keys).encode()
    # A copy of the current key (a rotation stopped between two steps) is not a second key.
    _key_file(tmp_path / "site.key.next", NEW)
    assert read_site_keys(site).accepted == (OLD,)


def test_an_accepted_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    site = _key_file(tmp_path / "site.key", NEW)
    _key_file(tmp_path / "site.key.next", OLD, 0o644)
    with pytest.raises(InsecureFile, match=r"accepted site key .*site\.key\.next.*chmod 0600"):
        read_site_keys(site)
    _key_file(tmp_path / "site.key.next", b"short")
    with pytest.raises(InsecureFile, match="too short"):
        read_site_keys(site)
