"""Heartbeat packets from a hostile network: mutations of genuine packets, authenticated
packets whose length fields lie, and the receiver's accounting (every drop counted once).

heartbeat/test_service.py already proves arbitrary bytes never raise and the round trip; here the
attacker also knows the key (a compromised site key must not crash the daemon either).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.farm import arp
from ha_runtime.generation import Generation
from ha_runtime.heartbeat.packet import (
    HEADER,
    MAC_LEN,
    MAX_HISTORY,
    MAX_PACKET,
    Drop,
    Heartbeat,
    decode,
    encode,
)
from ha_runtime.heartbeat.peers import LocalAnnounce, ModuleStream
from ha_runtime.heartbeat.service import HeartbeatService
from ha_runtime.states import Flag, State

KEY = b"k" * 48
SETTINGS = settings(max_examples=150, deadline=None)

heartbeats = st.builds(
    Heartbeat,
    node=st.text(min_size=1, max_size=20),
    module=st.text(min_size=1, max_size=20),
    network=st.text(min_size=1, max_size=10),
    state=st.sampled_from(State),
    flags=st.sampled_from(Flag),
    incarnation=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    generation=st.integers(0, 2**64 - 1),
    history=st.lists(st.integers(0, 2**64 - 1), max_size=MAX_HISTORY).map(tuple),
)


def _sign(body: bytes) -> bytes:
    return body + hmac.new(KEY, body, hashlib.sha256).digest()


@SETTINGS
@given(hb=heartbeats, data=st.data())
def test_any_change_to_a_genuine_packet_is_dropped(hb: Heartbeat, data: st.DataObject) -> None:
    good = encode(hb, KEY)
    pos = data.draw(st.integers(0, len(good) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(good)
    bad[pos] ^= flip
    assert isinstance(decode(bytes(bad), KEY), Drop)
    # truncated anywhere / extended by anything: never a heartbeat
    for cut in range(len(good)):
        assert decode(good[:cut], KEY) is Drop.TRUNCATED
    tail = data.draw(st.binary(min_size=1, max_size=40))
    assert decode(good + tail, KEY) in (Drop.MALFORMED, Drop.OVERSIZED)


@SETTINGS
@given(
    hb=heartbeats,
    nhist=st.integers(0, 255),
    lens=st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
    state=st.integers(0, 255),
    flags=st.integers(0, 255),
)
def test_authentic_packets_with_lying_fields_are_dropped_not_raised(
    hb: Heartbeat, nhist: int, lens: tuple[int, int, int], state: int, flags: int
) -> None:
    """The sender holds the key but lies in the header: counts, name lengths, enum values."""
    good = encode(hb, KEY)[:-MAC_LEN]
    fields = list(HEADER.unpack_from(good))
    fields[2], fields[3], fields[4] = flags, state, nhist
    fields[8:11] = lens
    body = HEADER.pack(*fields) + good[HEADER.size :]
    result = decode(_sign(body), KEY)
    honest = (nhist, *lens) == (
        len(hb.history),
        len(hb.node.encode()),
        len(hb.module.encode()),
        len(hb.network.encode()),
    )
    if not honest:
        if nhist > MAX_HISTORY:
            assert result is Drop.MALFORMED
        # Lengths that cut the same bytes into other well-formed fields make another,
        # consistent packet, which the key vouches for (hypothesis found one: 2 history
        # entries and names of 1, 1 and 4 bytes in what was 22 bytes of names); anything
        # accepted is exactly what the bytes say.
        assert isinstance(result, Drop) or encode(result, KEY) == _sign(body)
    elif state not in set(State):
        assert result is Drop.MALFORMED
    else:
        assert isinstance(result, Heartbeat) and result.state == state


@SETTINGS
@given(body=st.binary(min_size=HEADER.size, max_size=MAX_PACKET - MAC_LEN))
def test_authentic_random_bodies_never_raise(body: bytes) -> None:
    result = decode(_sign(b"HAPH\x01" + body[5:]), KEY)
    if isinstance(result, Heartbeat):  # only when every field checked out: it re-encodes
        assert encode(result, KEY) == _sign(b"HAPH\x01" + body[5:])


# Only run() writes state_dir (never called here); loading from a missing one is empty.
NO_STATE = Path("/nonexistent/hapair-fuzz")


def _service(drops: list[Drop]) -> HeartbeatService:
    return HeartbeatService(
        state_dir=NO_STATE,
        node="node1",
        key=KEY,
        port=0,
        bind={},
        peers={"node2": {"lan": "127.0.0.2"}},
        streams={"m": ModuleStream("m", ("node2",), 0.1, 1.0)},
        announce=lambda m: LocalAnnounce(State.SECOND, Flag.ELIGIBLE, Generation(5)),
        on_drop=drops.append,
    )


@SETTINGS
@given(
    datagrams=st.lists(
        st.one_of(
            st.binary(max_size=MAX_PACKET + 10),
            st.builds(
                lambda hb, seq, net: encode(replace(hb, seq=seq, network=net), KEY),
                st.builds(
                    Heartbeat,
                    st.sampled_from(["node2", "node1", "x"]),
                    st.sampled_from(["m", "other"]),
                    st.just("lan"),
                    st.sampled_from(State),
                    st.sampled_from(Flag),
                    st.integers(0, 3),
                    st.integers(0, 5),
                    st.integers(0, 5),
                ),
                st.integers(0, 5),
                st.sampled_from(["lan", "hb"]),
            ),
        ),
        max_size=30,
    )
)
def test_receiver_counts_every_rejection_exactly_once(datagrams: list[bytes]) -> None:
    drops: list[Drop] = []
    svc = _service(drops)
    accepted = 0
    for d in datagrams:
        r = svc.handle_datagram("lan", d)
        accepted += isinstance(r, Heartbeat)
    assert accepted + sum(svc.drops.values()) == len(datagrams)
    assert sorted(d.value for d in drops) == sorted(svc.drops.elements())
    assert svc.received["lan"] == accepted


def test_history_count_lie_is_malformed_regression() -> None:
    """nhist > MAX_HISTORY is refused before struct.unpack_from reads past the packet."""
    good = encode(Heartbeat("a", "b", "c", State.PRIM, Flag.NONE, 1, 1, 1), KEY)[:-MAC_LEN]
    fields = list(HEADER.unpack_from(good))
    fields[4] = 200
    body = HEADER.pack(*fields) + good[HEADER.size :] + struct.pack("!Q", 0) * 200
    assert decode(_sign(body)[:MAX_PACKET], KEY) in (Drop.MALFORMED, Drop.TRUNCATED)


# ------------------------------------------------------------------ farm ARP (raw socket)


@SETTINGS
@given(frame=st.binary(max_size=128), data=st.data())
def test_arp_parser_never_raises_and_only_accepts_ipv4_arp(
    frame: bytes, data: st.DataObject
) -> None:
    p = arp.parse(frame)
    assert p is None or frame[12:14] == b"\x08\x06"
    good = arp.gratuitous(b"\x0a\0\0\x01", b"\x02" * 6, b"\x04" * 6)
    assert arp.parse(good) is not None
    cut = data.draw(st.integers(0, 41))
    assert arp.parse(good[:cut]) is None
    pos = data.draw(st.sampled_from([12, 13, 14, 15, 16, 17, 18, 19]))  # type, htype/ptype/len
    bad = bytearray(good)
    bad[pos] ^= data.draw(st.integers(1, 255))
    assert arp.parse(bytes(bad)) is None
