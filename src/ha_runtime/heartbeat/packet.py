"""Heartbeat wire format: a fixed header, names, generation history, then HMAC-SHA256.

Decoding never raises: it returns either a Heartbeat or the reason the bytes were
dropped, because a receive loop fed by the network must survive anything. The HMAC is
checked before any field is trusted, and it covers the network name so a packet captured
on one heartbeat network cannot be replayed on another.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass

from ha_runtime.states import Flag, State

MAGIC = b"HAPH"
VERSION = 1
MAC_LEN = 32
MAX_HISTORY = 8
MAX_PACKET = 512
# magic, version, flags, state, history count, incarnation, seq, generation,
# node/module/network name lengths, reserved.
HEADER = struct.Struct("!4sBBBBQQQBBBB")
MIN_PACKET = HEADER.size + MAC_LEN


class Drop(enum.StrEnum):
    """Why a datagram was dropped; the values are metric labels."""

    TRUNCATED = "truncated"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    FORGED = "forged"
    # Authentic with the site key, but its sender has a pair key with us and has used it.
    SITE_KEY = "site_key"
    REPLAYED = "replayed"
    WRONG_NETWORK = "wrong_network"
    UNKNOWN_NODE = "unknown_node"
    UNKNOWN_MODULE = "unknown_module"
    ERROR = "error"


@dataclass(frozen=True)
class Heartbeat:
    node: str
    module: str
    network: str
    state: State
    flags: Flag
    incarnation: int
    seq: int
    generation: int
    history: tuple[int, ...] = ()


def encode(hb: Heartbeat, key: bytes) -> bytes:
    names = [hb.node.encode(), hb.module.encode(), hb.network.encode()]
    history = hb.history[:MAX_HISTORY]
    head = HEADER.pack(
        MAGIC,
        VERSION,
        int(hb.flags),
        int(hb.state),
        len(history),
        hb.incarnation,
        hb.seq,
        hb.generation,
        *(len(n) for n in names),
        0,
    )
    body = head + b"".join(struct.pack("!Q", h) for h in history) + b"".join(names)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decode(data: bytes, key: bytes) -> Heartbeat | Drop:
    if len(data) > MAX_PACKET:
        return Drop.OVERSIZED
    if len(data) < MIN_PACKET:
        return Drop.TRUNCATED
    magic, version, flags, state, nhist, inc, seq, gen, ln, lm, lw, _ = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or nhist > MAX_HISTORY:
        return Drop.MALFORMED
    expected = HEADER.size + 8 * nhist + ln + lm + lw + MAC_LEN
    if len(data) < expected:
        return Drop.TRUNCATED
    if len(data) > expected:
        return Drop.MALFORMED
    body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        return Drop.FORGED
    off = HEADER.size
    history = struct.unpack_from(f"!{nhist}Q", data, off)
    off += 8 * nhist
    try:
        node = data[off : off + ln].decode()
        module = data[off + ln : off + ln + lm].decode()
        network = data[off + ln + lm : off + ln + lm + lw].decode()
        st = State(state)
        fl = Flag(flags)
    except ValueError:  # UnicodeDecodeError is a ValueError
        return Drop.MALFORMED
    if not node or not module or not network:
        return Drop.MALFORMED
    return Heartbeat(node, module, network, st, fl, inc, seq, gen, tuple(history))


def peek_sender(data: bytes) -> str | None:
    """The node name a datagram claims, to choose the key to check it with (not trusted)."""
    if not MIN_PACKET <= len(data) <= MAX_PACKET:
        return None
    # The same unpacking as decode(): a change of the header breaks both, loudly.
    _m, _v, _f, _s, nhist, _i, _q, _g, ln, _lm, _lw, _ = HEADER.unpack_from(data)
    start = HEADER.size + 8 * nhist
    try:
        return data[start : start + ln].decode()
    except ValueError:
        return None


class ReplayGuard:
    """Accept each (sender, module, network) stream's packets only in increasing order.

    A sender's incarnation grows with each of its starts (heartbeat.persisted), so a restart
    resets the sequence without reopening old packets. Per network, because the same
    sequence number legitimately arrives once on each network. The marks are given back
    to be saved, so a restart of the receiver does not reopen them either.
    """

    def __init__(self, marks: dict[tuple[str, str, str], tuple[int, int]] | None = None) -> None:
        self._last: dict[tuple[str, str, str], tuple[int, int]] = dict(marks or {})
        self.dirty = False  # a mark changed since the last snapshot
        self.urgent = False  # a sender's new incarnation was accepted since then

    def accept(self, hb: Heartbeat) -> bool:
        key = (hb.node, hb.module, hb.network)
        mark = (hb.incarnation, hb.seq)
        last = self._last.get(key)
        if last is not None and mark <= last:
            return False
        if last is None or last[0] != hb.incarnation:
            self.urgent = True
        self._last[key] = mark
        self.dirty = True
        return True

    def newer(self, hb: Heartbeat) -> bool:
        """Whether accept() would take it (without taking it)."""
        last = self._last.get((hb.node, hb.module, hb.network))
        return last is None or (hb.incarnation, hb.seq) > last

    def forget(self, node: str) -> None:
        """Drop a sender's marks: they were set by packets that anyone could have signed."""
        for key in [k for k in self._last if k[0] == node]:
            del self._last[key]

    def snapshot(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """The marks to save; clears dirty and urgent."""
        self.dirty = self.urgent = False
        return dict(self._last)
