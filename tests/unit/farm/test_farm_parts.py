"""Farm engine parts without root: config section, ruleset text, ARP frames, member states."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from ha_runtime.config import FarmRule, parse_farm_section
from ha_runtime.farm.arp import (
    ARP_REPLY,
    ARP_REQUEST,
    build,
    gratuitous,
    mac_bytes,
    parse,
    reply_for,
)
from ha_runtime.farm.member import FarmMember, Membership, PeerView
from ha_runtime.farm.ruleset import render_bucket_update, render_removal, render_ruleset
from ha_runtime.farm.spec import FarmSpec, default_mac, handover_delay, igmp_group, seed_for
from ha_runtime.states import Flag, State

PATH = Path("/etc/hapair/modules/weather.yml")
NODES = ("node1", "node2", "node3")


def spec(**kw: object) -> FarmSpec:
    base: dict[str, object] = {
        "module": "weather",
        "vip": "10.77.0.200",
        "interface": "lan0",
        "powers": (("node1", 1), ("node2", 1), ("node3", 2)),
        "rules": (
            FarmRule("tcp", ((8080, 8080), (9000, 9010)), "address_port"),
            FarmRule("udp", ((53, 53),), "address"),
        ),
        "mac_mode": "multicast",
        "mac": default_mac("10.77.0.200", "multicast"),
        "seed": seed_for("weather"),
    }
    base.update(kw)
    return FarmSpec(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- spec


def test_farm_section_valid() -> None:
    settings, errors = parse_farm_section(
        {
            "mac_mode": "unicast",
            "power": {"node1": 3},
            "rules": [{"protocol": "udp", "ports": [53, "9000-9010"], "hash": "address"}],
        },
        PATH,
        NODES,
    )
    assert errors == []
    assert settings is not None
    assert settings.mac_mode == "unicast"
    assert settings.power == (("node1", 3),)
    assert settings.rules == (FarmRule("udp", ((53, 53), (9000, 9010)), "address"),)


def test_farm_section_reports_every_error_with_file_and_field() -> None:
    settings, errors = parse_farm_section(
        {
            "mac_mode": "broadcast",
            "mac": "01:00:5e:ff:00:01",
            "power": {"node9": 1, "node2": 0},
            "rules": [{"protocol": "sctp", "ports": [0, "90-80"], "hash": "port", "x": 1}],
            "colour": "blue",
        },
        PATH,
        NODES,
    )
    assert settings is None
    text = "\n".join(errors)
    for where in (
        "farm.mac_mode",
        "farm.power.node9",
        "farm.power.node2",
        "farm.rules[0].protocol",
        "farm.rules[0].hash",
        "farm.rules[0].x",
        "farm.rules[0].ports[0]",
        "farm.rules[0].ports[1]",
        "farm.colour",
    ):
        assert f"{PATH}: {where}:" in text, where
    assert parse_farm_section({}, PATH, NODES)[1] == [
        f"{PATH}: farm.rules: required field is missing (at least one rule)"
    ]


def test_macs_derive_from_the_vip() -> None:
    assert default_mac("10.77.0.200", "multicast") == "01:00:5e:7f:00:c8"
    assert igmp_group("01:00:5e:7f:00:c8") == "239.255.0.200"
    assert default_mac("10.77.0.200", "unicast") == "02:bf:0a:4d:00:c8"
    assert seed_for("weather") == seed_for("weather") != seed_for("other")


# --------------------------------------------------------------------------- ruleset


def test_ruleset_text() -> None:
    text = render_ruleset(spec(), [3, 1, 2])
    assert "elements = { 1, 2, 3 }" in text
    assert 'device "lan0"' in text
    assert "ether daddr 01:00:5e:7f:00:c8 meta pkttype set host" in text
    assert "arp saddr ip 10.77.0.200 counter drop" in text
    seed = f"seed 0x{seed_for('weather'):08x}"
    tcp = [line.strip() for line in text.splitlines() if "tcp dport { 8080, 9000-9010 }" in line]
    assert tcp == [
        "tcp dport { 8080, 9000-9010 } ct state established,related accept",
        "tcp dport { 8080, 9000-9010 } tcp flags & (fin | syn | rst | ack) == syn "
        f'jhash ip saddr . tcp sport mod 256 {seed} @mine counter name "served" accept',
        "tcp dport { 8080, 9000-9010 } "
        f"jhash ip saddr . tcp sport mod 256 {seed} @orphans accept",
        'tcp dport { 8080, 9000-9010 } counter name "foreign" drop',
    ]
    assert f"udp dport {{ 53 }} jhash ip saddr mod 256 {seed} @mine accept" in text
    # Applying replaces any previous copy in the same transaction.
    assert text.index("delete table ip hapair-farm-weather") < text.index(
        "table ip hapair-farm-weather {"
    )


def test_empty_bucket_set_and_updates() -> None:
    assert "elements" not in render_ruleset(spec(), [])
    assert render_bucket_update(spec(), [5, 4], [4]) == (
        "flush set ip hapair-farm-weather mine\n"
        "add element ip hapair-farm-weather mine { 4, 5 }\n"
        "flush set ip hapair-farm-weather orphans\n"
        "add element ip hapair-farm-weather orphans { 4 }\n"
    )
    assert render_bucket_update(spec(), []) == (
        "flush set ip hapair-farm-weather mine\nflush set ip hapair-farm-weather orphans\n"
    )
    removal = render_removal(spec())
    assert removal.count("delete table") == 3


# --------------------------------------------------------------------------- ARP


def test_arp_reply_carries_the_virtual_mac_from_the_node_mac() -> None:
    vip = socket.inet_aton("10.77.0.200")
    vmac = mac_bytes("01:00:5e:7f:00:c8")
    own = mac_bytes("52:54:00:00:00:11")
    client = mac_bytes("52:54:00:00:00:50")
    cip = socket.inet_aton("10.77.0.50")
    request = build(client, b"\xff" * 6, ARP_REQUEST, client, cip, b"\0" * 6, vip)
    packet = parse(request)
    assert packet is not None
    answer = reply_for(packet, vip, vmac, own)
    assert answer is not None
    reply = parse(answer)
    assert reply is not None
    assert (reply.eth_src, reply.eth_dst, reply.op) == (own, client, ARP_REPLY)
    assert (reply.sha, reply.spa, reply.tha, reply.tpa) == (vmac, vip, client, cip)
    # Not for the VIP, a reply, our own gratuitous ARP, garbage: no answer.
    other = build(client, b"\xff" * 6, ARP_REQUEST, client, cip, b"\0" * 6, cip)
    for frame in (other, answer, gratuitous(vip, vmac, own)):
        p = parse(frame)
        assert p is not None and reply_for(p, vip, vmac, own) is None
    assert parse(b"\x00" * 10) is None
    assert parse(request[:12] + b"\x08\x00" + request[14:]) is None


# --------------------------------------------------------------------------- member


def state_of(m: FarmMember) -> State:
    return m.state  # a call: mypy must not narrow the attribute across transitions


def peers(*alive: str, eligible: bool = True) -> Membership:
    return Membership(peers=tuple(PeerView(n, n in alive, eligible) for n in NODES))


def test_member_states_and_buckets() -> None:
    m = FarmMember(spec(), "node1")
    assert state_of(m) == State.STOP and m.my_buckets == frozenset()
    m.start()
    assert state_of(m) == State.WAIT  # no membership report yet
    t = m.update(peers("node2", "node3"))
    assert t is not None and (t.old, t.new) == (State.WAIT, State.UP)
    assert m.announcement == (State.UP, Flag.ELIGIBLE)
    assert len(m.my_buckets) == 64  # powers 1, 1, 2
    mine = m.my_buckets
    m.update(peers("node2"))  # node3 died: node1 only gains
    assert mine < m.my_buckets and len(m.my_buckets) == 128
    m.update(Membership(peers=peers("node2").peers, healthy=False, health_reason="http"))
    assert state_of(m) == State.WAIT and m.reason == "checker failing: http"
    assert m.my_buckets == frozenset() and m.announcement == (State.WAIT, Flag.NONE)
    assert m.bucket_map.counts() == {"node2": 256}
    m.update(peers("node2"))
    m.drain()
    assert state_of(m) == State.WAIT and m.reason == "drained by the operator"
    m.undrain()
    assert state_of(m) == State.UP
    m.stop()
    assert state_of(m) == State.STOP and m.my_buckets == frozenset()


def test_peer_not_eligible_is_not_a_member_and_isolation_waits() -> None:
    m = FarmMember(spec(witness=True), "node1")
    m.start()
    m.update(peers("node2", "node3", eligible=False))
    assert m.members == ("node1",)
    m.update(Membership(peers=peers().peers, witness_ok=False))
    assert state_of(m) == State.WAIT and "isolated" in m.reason
    m.update(Membership(peers=peers().peers, witness_ok=True))
    assert state_of(m) == State.UP and m.members == ("node1",)


def test_isolated_member_releases_its_buckets_while_peers_still_count_as_alive() -> None:
    m = FarmMember(spec(witness=True), "node1")
    m.start()
    m.update(peers("node2", "node3"))
    assert state_of(m) == State.UP and m.my_buckets
    # The peers are not yet past their timeout, but this node heard none of them for a third
    # of it and its witness probe went unanswered: it gives every bucket up now.
    m.update(replace(peers("node2", "node3"), witness_ok=False, isolated=True))
    assert state_of(m) == State.WAIT and m.my_buckets == frozenset()
    m.update(peers("node2", "node3"))  # heard again: back in, with its share
    assert state_of(m) == State.UP and len(m.my_buckets) == 64


def test_orphans_are_buckets_taken_from_a_dead_node_by_a_node_left_alone() -> None:
    m = FarmMember(spec(), "node1")
    m.start()
    m.update(peers("node2", "node3"))
    assert m.orphans == frozenset()
    before = m.my_buckets
    # node2 drains (alive, WAIT): what node1 gains is not orphaned, node2 still serves it.
    m.update(Membership(peers=(PeerView("node2", True, False), PeerView("node3", True, True))))
    assert m.my_buckets > before and m.orphans == frozenset()
    m.update(peers("node2", "node3"))
    # node3 dies while node2 lives: node2 may hold connections in any bucket, no orphans.
    m.update(peers("node2"))
    assert m.orphans == frozenset()
    # node2 dies too: node1 is alone; what it takes from node2 is orphaned.
    owners = m.bucket_map.owners
    m.update(peers())
    from_node2 = frozenset(b for b, o in enumerate(owners) if o == "node2")
    assert from_node2 and m.orphans == from_node2
    # node2 returns: nothing is orphaned any more.
    m.update(peers("node2"))
    assert m.orphans == frozenset()


def test_a_node_starting_alone_has_no_orphans() -> None:
    m = FarmMember(spec(), "node1")
    m.start()
    m.update(peers())
    assert len(m.my_buckets) == 256 and m.orphans == frozenset()


def test_a_bucket_is_taken_from_a_live_owner_only_after_the_handover_delay() -> None:
    """The fault campaign saw node1 and node2 answer the same 128 buckets for ~13 ms when
    node2 came back (it took its share before node1 had heard it). Now a bucket whose owner
    is alive is taken handover_s later; one whose owner is dead, at once."""
    joining = FarmMember(spec(handover_s=0.3), "node2")
    joining.start()
    joining.update(peers("node1", "node3"), now=10.0)  # first report: the others serve all
    assert state_of(joining) == State.UP and joining.my_buckets == frozenset()
    assert joining.next_due() == pytest.approx(10.3)
    joining.tick(10.29)
    assert joining.my_buckets == frozenset()
    joining.tick(10.31)
    assert len(joining.my_buckets) == 64 and joining.next_due() is None

    # Back from WAIT (a checker failed, then passed): the same delay.
    joining.update(Membership(peers=peers("node1", "node3").peers, healthy=False), now=20.0)
    assert joining.my_buckets == frozenset()
    joining.update(peers("node1", "node3"), now=21.0)
    assert joining.my_buckets == frozenset()
    joining.tick(21.31)
    assert len(joining.my_buckets) == 64

    # node3 dies: nobody answers its buckets any more, node2 takes its part of them at once.
    before = joining.my_buckets
    joining.update(peers("node1"), now=30.0)
    assert joining.my_buckets > before and joining.next_due() is None


def test_no_handover_delay_configured_takes_at_once() -> None:
    m = FarmMember(spec(), "node2")
    m.start()
    m.update(peers("node1", "node3"), now=1.0)
    assert len(m.my_buckets) == 64 and m.next_due() is None


def test_handover_delay_follows_the_heartbeat_interval() -> None:
    assert handover_delay(0.1) == pytest.approx(0.3)
    assert handover_delay(0.02) == pytest.approx(0.2)
