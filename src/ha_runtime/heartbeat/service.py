"""UDP heartbeats on every configured network, one authenticated stream per module.

One socket per heartbeat network (bound to this node's address on it) carries the
streams of every module; each module sends at its own interval. A peer is alive for a
module while at least one network delivered a valid heartbeat within the module's
timeout: losing the dedicated link alone is not a failure, losing every network is.
Anything a network hands us that is not a fresh, authentic heartbeat from a known node
for a known module is dropped and counted by reason; the receive loop never raises.
This node's incarnation and what it accepted last from each peer stream are kept in
state_dir (heartbeat.persisted), so neither a restart nor a clock set back reopens old packets.
Packets to and from a peer are signed with the key of the pair when the deploy gave one
(heartbeat.keys), so a third node cannot sign in another's name.
During a site key rotation, packets with the site key are made with the current one and
also taken when made with an accepted one (security.SiteKeys): the peer may not have
switched yet, or already has. Those are counted (`accepted_key_packets`).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import trio

from ha_runtime.heartbeat.packet import Drop, Heartbeat, ReplayGuard, decode, encode, peek_sender
from ha_runtime.heartbeat.peers import LocalAnnounce, ModuleStream, PeerTable
from ha_runtime.heartbeat.persisted import (
    SAVE_INTERVAL_S,
    ReplayState,
    load_marks,
    next_incarnation,
    save_marks,
)

log = logging.getLogger(__name__)

RECV_BUFFER = 2048  # larger than MAX_PACKET so oversized datagrams are seen as such


class Via(enum.Enum):
    """The key a packet proved authentic with."""

    PAIR = "pair"
    SITE = "site"  # the current site key
    ACCEPTED = "accepted"  # another site key, accepted during a rotation


class HeartbeatService:
    def __init__(
        self,
        *,
        node: str,
        key: bytes,
        port: int,
        bind: dict[str, str],  # network -> local address
        peers: dict[str, dict[str, str]],  # peer node -> network -> address
        streams: dict[str, ModuleStream],
        announce: Callable[[str], LocalAnnounce],
        on_drop: Callable[[Drop], None] | None = None,
        state_dir: Path,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        pair_keys: dict[str, bytes] | None = None,  # peer -> key of the pair (heartbeat.keys)
        accepted_keys: tuple[bytes, ...] = (),  # other site keys, during a rotation
    ) -> None:
        self.node = node
        self._key = key  # the site key: peers without a pair key, and the rollout
        self._accepted_keys = accepted_keys
        # Heartbeats taken with an accepted key: a rotation is under way (or was left half done).
        self.accepted_key_packets = 0
        self._pair_keys = dict(pair_keys or {})
        self._port = port
        self._bind = bind
        self._peers = peers
        self.streams = streams
        self._announce = announce
        self._on_drop = on_drop
        self._state_dir = state_dir
        self._wall_clock_ns = wall_clock_ns
        self.incarnation = 0  # set by run(), durably, before the first heartbeat
        self._seq = 0
        saved = load_marks(state_dir)
        self._guard = ReplayGuard(saved.marks)
        # Peers that signed with their pair key: their site-key packets are refused.
        self._pair_keyed = saved.pair_keyed
        # ...when a third node holds the site key. In a site of two nodes the site key is
        # held by the same two as the pair key, so it proves the sender as well, and a peer
        # rolled back to a release without pair keys (or a stale record of a release run
        # before a rollback) must not make this node deaf to it.
        self._site_key_forgeable = len(peers) >= 2
        # Peers known to read the pair key: they get ours with it only. A peer seen sending
        # with the site key only (rolled back to a runtime or a deploy without pair keys)
        # gets both forms again, so it keeps hearing this node.
        self._reads_pair = set(saved.pair_keyed)
        self._save_now = trio.Event()
        self.table = PeerTable(streams, clock)
        self.drops: Counter[str] = Counter()
        self.received: Counter[str] = Counter()  # network -> valid heartbeats
        self.send_errors: Counter[str] = Counter()
        self._socks: dict[str, trio.socket.SocketType] = {}
        self.ready = trio.Event()

    async def run(self) -> None:
        self.incarnation = next_incarnation(self._state_dir, self._wall_clock_ns())
        for net, addr in sorted(self._bind.items()):
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            await sock.bind((addr, self._port))
            self._socks[net] = sock
        self.ready.set()
        try:
            async with trio.open_nursery() as nursery:
                for net, sock in self._socks.items():
                    nursery.start_soon(self._receive_loop, net, sock)
                for stream in self.streams.values():
                    nursery.start_soon(self._send_loop, stream)
                nursery.start_soon(self._save_loop)
        finally:
            for sock in self._socks.values():
                sock.close()
            if self._guard.dirty:
                self._save_marks(self._replay_state())

    def bound_port(self, network: str) -> int:
        port: int = self._socks[network].getsockname()[1]
        return port

    # ----------------------------------------------------------------- receive

    async def _receive_loop(self, network: str, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                data, _addr = await sock.recvfrom(RECV_BUFFER)
            except OSError as exc:  # e.g. ICMP errors reported on the socket
                log.debug("heartbeat recv on %s: %s", network, exc)
                continue
            try:
                self.handle_datagram(network, data)
            except Exception:  # a receive loop must never die on input
                log.exception("heartbeat: unexpected error handling a datagram on %s", network)
                self._drop(Drop.ERROR)

    def _authenticate(self, data: bytes) -> tuple[Heartbeat | Drop, Via]:
        """Decode with the claimed sender's pair key, else the site keys; (result, key used)."""
        sender = peek_sender(data)
        pair = self._pair_keys.get(sender) if sender is not None else None
        if pair is not None:
            result = decode(data, pair)
            if result is not Drop.FORGED:  # authentic, or refused whatever the key
                return result, Via.PAIR
        result, via = self._decode_site(data)
        if pair is not None and sender in self._pair_keyed and isinstance(result, Heartbeat):
            if self._guard.newer(result):  # not the copy of a pair-keyed packet we took:
                self._reads_pair.discard(result.node)  # it may read only the site key now
            if self._site_key_forgeable:  # a third node holds the site key: not proof
                return Drop.SITE_KEY, via
        return result, via

    def _decode_site(self, data: bytes) -> tuple[Heartbeat | Drop, Via]:
        """The current site key, then (only for a packet it refuses, so the usual case costs
        one MAC) each key a rotation accepts; a packet no key proves stays FORGED."""
        result = decode(data, self._key)
        if result is not Drop.FORGED:
            return result, Via.SITE
        for key in self._accepted_keys:
            result = decode(data, key)
            if result is not Drop.FORGED:
                return result, Via.ACCEPTED
        return Drop.FORGED, Via.SITE

    def handle_datagram(self, network: str, data: bytes) -> Heartbeat | Drop:
        result, via = self._authenticate(data)
        pair_keyed = via is Via.PAIR
        if isinstance(result, Drop):
            return self._drop(result)
        hb = result
        if hb.network != network:
            return self._drop(Drop.WRONG_NETWORK)
        if hb.node == self.node or hb.node not in self._peers:
            return self._drop(Drop.UNKNOWN_NODE)
        stream = self.streams.get(hb.module)
        if stream is None or hb.node not in stream.peers:
            return self._drop(Drop.UNKNOWN_MODULE)
        if pair_keyed and hb.node not in self._pair_keyed:
            # From now on only the pair key proves this sender. Marks set by site-key
            # packets are dropped: a forger could have pushed them far ahead.
            self._pair_keyed.add(hb.node)
            self._guard.forget(hb.node)
        if pair_keyed:
            self._reads_pair.add(hb.node)
        if not self._guard.accept(hb):
            return self._drop(Drop.REPLAYED)
        if via is Via.ACCEPTED:  # counted when taken, not its replays
            self.accepted_key_packets += 1
        if self._guard.urgent:  # a peer restarted: remember its new incarnation now
            self._save_now.set()
        self.received[network] += 1
        self.table.record(hb)
        return hb

    def _drop(self, reason: Drop) -> Drop:
        self.drops[reason.value] += 1
        if self._on_drop is not None:
            self._on_drop(reason)
        return reason

    async def _save_loop(self) -> None:
        # Off the event loop: an fsync on a busy disk must not delay heartbeats.
        while True:
            with trio.move_on_after(SAVE_INTERVAL_S):
                await self._save_now.wait()
            self._save_now = trio.Event()
            if self._guard.dirty:
                await trio.to_thread.run_sync(self._save_marks, self._replay_state())

    def _replay_state(self) -> ReplayState:
        return ReplayState(self._guard.snapshot(), set(self._pair_keyed))

    def _save_marks(self, state: ReplayState) -> None:
        try:
            save_marks(self._state_dir, state)
        except OSError as exc:  # a full disk must not stop the heartbeats: retried next time
            log.warning("heartbeat: cannot save replay marks in %s: %s", self._state_dir, exc)
            self._guard.dirty = True

    # ----------------------------------------------------------------- send

    async def _send_loop(self, stream: ModuleStream) -> None:
        while True:
            await self.send_now(stream.name)
            await trio.sleep(stream.interval_s)

    async def send_now(self, module: str) -> None:
        """Send one heartbeat of `module` on every network (also used right after a change)."""
        stream = self.streams[module]
        a = self._announce(module)
        self._seq += 1
        for net, sock in self._socks.items():
            hb = Heartbeat(
                node=self.node,
                module=module,
                network=net,
                state=a.state,
                flags=a.flags,
                incarnation=self.incarnation,
                seq=self._seq,
                generation=a.generation.current,
                history=a.generation.history,
            )
            for peer in stream.peers:
                addr = self._peers.get(peer, {}).get(net)
                if addr is None:
                    continue
                for key in self._send_keys(peer):
                    try:
                        await sock.sendto(encode(hb, key), (addr, self._port))
                    except OSError as exc:  # a cut link: the other networks carry on
                        self.send_errors[net] += 1
                        log.debug("heartbeat send to %s on %s: %s", peer, net, exc)

    def _send_keys(self, peer: str) -> tuple[bytes, ...]:
        pair = self._pair_keys.get(peer)
        if pair is None:
            return (self._key,)
        if peer in self._reads_pair:
            return (pair,)
        # The peer may not have the pair key yet (rolling deploy): the site-key copy keeps
        # this node alive to it until it answers with the pair key.
        return (pair, self._key)
