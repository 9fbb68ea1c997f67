"""Per-pair heartbeat keys in a farm of three: a node cannot forge another node's packets.

node1 and node2 share the pair key K12, node1 and node3 K13, node2 and node3 K23; every
node also holds the site key (the replication and older runtimes use it). node3 holds
everything a node of the site holds except K12, and tries to pass as node1 to node2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.generation import Generation
from ha_runtime.heartbeat.keys import pair_key_path, read_pair_keys
from ha_runtime.heartbeat.packet import Heartbeat, encode, peek_sender
from ha_runtime.heartbeat.peers import LocalAnnounce, ModuleStream, PeerStatus
from ha_runtime.heartbeat.service import HeartbeatService
from ha_runtime.security import InsecureFile
from ha_runtime.states import Flag, State
from tests.sitefactory import free_port, wait

SITE = b"s" * 48
K12, K13, K23 = b"1" * 48, b"2" * 48, b"3" * 48
ADDR = {"node1": "127.0.0.1", "node2": "127.0.0.2", "node3": "127.0.0.3"}
KEYS = {
    "node1": {"node2": K12, "node3": K13},
    "node2": {"node1": K12, "node3": K23},
    "node3": {"node1": K13, "node2": K23},
}
MODULE = "farm"


def _service(
    node: str,
    port: int,
    state_dir: Path,
    pair_keys: dict[str, bytes] | None,
    site: tuple[str, ...] = tuple(ADDR),
) -> HeartbeatService:
    peers = tuple(n for n in site if n != node)
    pair_keys = None if pair_keys is None else {p: k for p, k in pair_keys.items() if p in peers}
    return HeartbeatService(
        node=node,
        key=SITE,
        port=port,
        bind={"lan": ADDR[node]},
        peers={p: {"lan": ADDR[p]} for p in peers},
        streams={MODULE: ModuleStream(MODULE, peers, 0.05, 0.6)},
        announce=lambda m: LocalAnnounce(State.PRIM, Flag.ELIGIBLE, Generation(5)),
        state_dir=state_dir / node,
        pair_keys=pair_keys,
    )


def _alive(rx: HeartbeatService, peer: str) -> bool:
    return rx.table.view(MODULE, peer).status is PeerStatus.ALIVE


def _forgeries() -> dict[bytes, str]:
    """node3's best attempts at a packet from node1: a takeover, far ahead in sequence."""
    fake = Heartbeat("node1", MODULE, "lan", State.STOP, Flag.NONE, 2**63, 1, 2**62)
    return {encode(fake, key): name for key, name in ((SITE, "site"), (K13, "K13"), (K23, "K23"))}


def _assert_refused(rx: HeartbeatService) -> None:
    before = rx.table.view(MODULE, "node1")
    for pkt, name in _forgeries().items():
        result = rx.handle_datagram("lan", pkt)
        assert not isinstance(result, Heartbeat), f"node2 took node3's packet signed with {name}"
    after = rx.table.view(MODULE, "node1")
    assert (after.state, after.generation) == (before.state, before.generation)


async def _pair_alive(
    nursery: trio.Nursery, port: int, tmp: Path
) -> tuple[HeartbeatService, HeartbeatService]:
    """node1 and node2, each with its pair keys, running in `nursery` and hearing each other."""
    n1 = _service("node1", port, tmp, KEYS["node1"])
    n2 = _service("node2", port, tmp, KEYS["node2"])
    nursery.start_soon(n1.run)
    nursery.start_soon(n2.run)
    await wait(lambda: _alive(n2, "node1") and _alive(n1, "node2"), what="pair alive")
    return n1, n2


def test_third_node_cannot_forge_node1_to_node2(tmp_path: Path) -> None:
    port = free_port()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _n1, n2 = await _pair_alive(nursery, port, tmp_path)
            before = n2.drops.copy()
            _assert_refused(n2)
            # (node1's own site-key copies, sent until it heard node2's pair key, are
            # refused too: hence the difference)
            assert n2.drops - before == {"site_key": 1, "forged": 2}, (before, n2.drops)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_once_both_use_their_pair_key_no_site_key_copies_are_sent(tmp_path: Path) -> None:
    # Seen in the lab: each site-key copy made the receiver send copies again, forever.
    port = free_port()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            n1, n2 = await _pair_alive(nursery, port, tmp_path)
            await trio.sleep(0.3)  # both have heard the other's pair key by now
            before = (n1.drops["site_key"], n2.drops["site_key"])
            await trio.sleep(0.5)  # ten more intervals
            assert (n1.drops["site_key"], n2.drops["site_key"]) == before
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_refusal_of_the_site_key_survives_a_restart(tmp_path: Path) -> None:
    port = free_port()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            n1 = _service("node1", port, tmp_path, KEYS["node1"])
            n2 = _service("node2", port, tmp_path, KEYS["node2"])
            n1_scope, n2_scope = trio.CancelScope(), trio.CancelScope()

            async def run(svc: HeartbeatService, scope: trio.CancelScope) -> None:
                with scope:
                    await svc.run()

            nursery.start_soon(run, n1, n1_scope)
            nursery.start_soon(run, n2, n2_scope)
            await wait(lambda: _alive(n2, "node1"), what="node2 hears node1")
            n1_scope.cancel()
            n2_scope.cancel()
            await trio.sleep(0.05)
            # node2 restarted; node1 is down: nothing pair-keyed has arrived since.
            again = _service("node2", port, tmp_path, KEYS["node2"])
            _assert_refused(again)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_rollout_a_node_without_pair_keys_and_one_with_see_each_other(tmp_path: Path) -> None:
    # The deploy restarts one node at a time: for a while one runs without the pair keys
    # (or an older runtime, site key only). Neither may look dead to the other.
    port = free_port()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            old = _service("node1", port, tmp_path, None)
            new = _service("node2", port, tmp_path, KEYS["node2"])
            nursery.start_soon(old.run)
            nursery.start_soon(new.run)
            await wait(lambda: _alive(new, "node1") and _alive(old, "node2"), what="pair alive")
            await trio.sleep(0.7)  # past the timeout: still alive on what is accepted
            assert _alive(new, "node1") and _alive(old, "node2")
            assert "site_key" not in new.drops
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_rollback_a_node_without_pair_keys_still_hears_its_peer(tmp_path: Path) -> None:
    # node1 is rolled back to a deploy without pair keys: node2 cannot tell it from a
    # forger and refuses its site-key packets (until the rollback reaches node2 as well:
    # docs/configuration.md), but it sends both forms again so node1 keeps hearing it.
    port = free_port()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            n1 = _service("node1", port, tmp_path, KEYS["node1"])
            n2 = _service("node2", port, tmp_path, KEYS["node2"])
            n1_scope = trio.CancelScope()

            async def run_n1() -> None:
                with n1_scope:
                    await n1.run()

            nursery.start_soon(run_n1)
            nursery.start_soon(n2.run)
            await wait(lambda: _alive(n2, "node1") and _alive(n1, "node2"), what="pair alive")
            await trio.sleep(0.2)  # both confirmed: pair-keyed packets only
            n1_scope.cancel()
            old = _service("node1", port, tmp_path, None)
            nursery.start_soon(old.run)
            await wait(lambda: old.received["lan"] > 0, what="the rolled-back node1 hears node2")
            await trio.sleep(0.7)  # past the timeout
            assert _alive(old, "node2")
            assert n2.drops["site_key"] > 0 and not _alive(n2, "node1")
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_pair_key_files(tmp_path: Path) -> None:
    site_key = tmp_path / "site.key"
    assert read_pair_keys(site_key, ["node2", "node3"]) == {}  # none deployed: site key
    p2 = pair_key_path(site_key, "node2")
    p2.parent.mkdir(mode=0o700)
    p2.write_bytes(K12 + b"\n")
    p2.chmod(0o600)
    assert read_pair_keys(site_key, ["node2", "node3"]) == {"node2": K12}
    p2.chmod(0o644)
    with pytest.raises(InsecureFile, match=r"node2\.key.*chmod 0600"):
        read_pair_keys(site_key, ["node2"])
    p2.chmod(0o600)
    p2.write_bytes(b"short\n")
    with pytest.raises(InsecureFile, match="too short"):
        read_pair_keys(site_key, ["node2"])
    assert os.geteuid() == p2.stat().st_uid


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["node1", "node3", "x", ""]),
            st.sampled_from([SITE, K12, K13, K23, b"other" * 8]),
            st.integers(0, 2**64 - 1),
            st.binary(max_size=80),
        ),
        max_size=20,
    )
)
def test_receiver_with_pair_keys_counts_everything_once(
    items: list[tuple[str, bytes, int, bytes]],
) -> None:
    rx = _service("node2", 0, Path("/nonexistent/hapair-fuzz"), KEYS["node2"])  # never run
    for node, key, seq, junk in items:
        hb = Heartbeat(node or "y", MODULE, "lan", State.PRIM, Flag.NONE, 1, seq, 0)
        data = encode(hb, key)
        for datagram in (data, data[: len(junk)] + junk, junk):
            assert peek_sender(datagram) is None or isinstance(peek_sender(datagram), str)
            before = sum(rx.drops.values()) + sum(rx.received.values())
            ratcheted = set(rx._pair_keyed)
            result = rx.handle_datagram("lan", datagram)
            assert sum(rx.drops.values()) + sum(rx.received.values()) == before + 1
            if isinstance(result, Heartbeat):  # signed with the key of its own pair, or
                # with the site key by a peer that has not yet used its pair key
                assert result.node in {"node1", "node3"}
                own = KEYS["node2"][result.node]
                assert key == own or (key == SITE and result.node not in ratcheted)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40), st.lists(st.integers(0, 2**64 - 1), max_size=8))
def test_peek_sender_reads_the_node_name(node: str, history: list[int]) -> None:
    hb = Heartbeat(node, MODULE, "lan", State.PRIM, Flag.NONE, 1, 2, 3, tuple(history))
    assert peek_sender(encode(hb, SITE)) == node


def _node_files(tmp: Path) -> Path:
    """A node file whose secrets are all in place and root-only; returns cluster.yml."""
    (tmp / "modules").mkdir()
    for name in ("site.key", "ca.crt", "node.crt", "node.key"):
        (tmp / name).write_bytes(SITE + b"\n")
        (tmp / name).chmod(0o600)
    (tmp / "cluster.yml").write_text(
        f"""
node: node1
nodes:
  - {{name: node1, addresses: {{lan: 127.0.0.1}}}}
  - {{name: node2, addresses: {{lan: 127.0.0.2}}}}
  - {{name: node3, addresses: {{lan: 127.0.0.3}}}}
site_key: {tmp}/site.key
tls: {{ca: {tmp}/ca.crt, cert: {tmp}/node.crt, key: {tmp}/node.key}}
state_dir: {tmp}/state
modules_dir: {tmp}/modules
"""
    )
    return tmp / "cluster.yml"


def test_daemon_start_reads_the_pair_keys_and_refuses_an_exposed_one(tmp_path: Path) -> None:
    from ha_runtime.cli import _load_for_daemon  # noqa: PLC0415 - the daemon's own loader

    cluster = _node_files(tmp_path)
    key_dir = tmp_path / "heartbeat"
    key_dir.mkdir(mode=0o700)
    (key_dir / "node2.key").write_bytes(K12 + b"\n")
    (key_dir / "node2.key").chmod(0o600)
    loaded = _load_for_daemon(cluster)
    assert not isinstance(loaded, list), loaded
    assert loaded[1].current == SITE and loaded[1].accepted == ()  # no rotation under way
    assert loaded[2] == {"node2": K12}  # node3: the site key
    (key_dir / "node2.key").chmod(0o640)
    refused = _load_for_daemon(cluster)
    assert isinstance(refused, list) and len(refused) == 1
    assert "heartbeat key of node2" in refused[0] and "chmod 0600" in refused[0], refused


def test_in_a_site_of_two_a_rolled_back_peer_is_heard_again(tmp_path: Path) -> None:
    # Seen in the lab's upgrade test: the site ran this release (node1 recorded that node2
    # signs with its pair key), was rolled back, then upgraded again; node1, upgraded first,
    # refused the still-old node2's site-key packets for good and stayed WAIT. With two
    # nodes no third one holds the site key, so it proves node2 as well as the pair key.
    port = free_port()
    pair = ("node1", "node2")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            n1_scope = trio.CancelScope()
            n1 = _service("node1", port, tmp_path, KEYS["node1"], pair)
            n2 = _service("node2", port, tmp_path, KEYS["node2"], pair)

            async def run(service: HeartbeatService, scope: trio.CancelScope) -> None:
                with scope:
                    await service.run()

            nursery.start_soon(run, n1, n1_scope)
            nursery.start_soon(n2.run)
            await wait(lambda: _alive(n2, "node1") and _alive(n1, "node2"), what="pair alive")
            await trio.sleep(0.2)  # both confirmed: node2 recorded node1 as pair-keyed
            assert "node1" in n2._replay_state().pair_keyed
            n1_scope.cancel()
            old = _service("node1", port, tmp_path, None, pair)  # rolled back: site key only
            nursery.start_soon(old.run)
            await wait(lambda: old.received["lan"] > 0, what="the rolled-back node1 hears node2")
            await trio.sleep(0.7)  # past the timeout
            assert _alive(old, "node2") and _alive(n2, "node1")
            assert "site_key" not in n2.drops
            nursery.cancel_scope.cancel()

    trio.run(main)
