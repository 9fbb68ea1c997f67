"""FarmService: the one object the daemon runs per farm module on a node.

Contract (docs/farm.md has the long form):

    service = FarmService(spec, node_name)
    async with trio.open_nursery() as nursery:
        send, recv = trio.open_memory_channel[Membership](16)
        await nursery.start(service.run, recv)   # installed, state WAIT/UP, ARP answered
        await send.send(Membership(peers=...))   # on every heartbeat/checker change
        service.status(); service.drain(); service.undrain(); service.announcement
        await send.aclose()                      # or cancel: everything is removed

`run` installs (VIP /32, virtual MAC acceptance, nftables tables with this node's buckets,
ARP responder), then follows membership snapshots until the channel is closed or the task
is cancelled, and always removes what it installed on the way out (shielded). The
application scripts (`start_both`/`stop_both`) stay with the manager: run `start_both`
before `run`, `stop_both` after it returns.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from ha_runtime.farm import ruleset
from ha_runtime.farm.arp import ArpResponder
from ha_runtime.farm.member import FarmMember, Membership, Transition
from ha_runtime.farm.netif import NodeInterface
from ha_runtime.farm.spec import FarmSpec
from ha_runtime.states import Flag, State

log = logging.getLogger("hapair.farm")
COUNTER_INTERVAL_S = 2.0


@dataclass(frozen=True)
class MemberStatus:
    node: str
    power: int
    alive: bool
    eligible: bool
    buckets: int


@dataclass(frozen=True)
class FarmStatus:
    module: str
    node: str
    state: str
    reason: str
    drained: bool
    vip: str
    mac: str
    mac_mode: str
    members: list[MemberStatus] = field(default_factory=list)
    my_buckets: int = 0
    connections_served: int = 0  # new connections (TCP SYN, new UDP flows) accepted here
    foreign_packets: int = 0  # packets to the VIP left to other nodes
    arp_requests: int = 0
    arp_replies: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FarmService:
    def __init__(self, spec: FarmSpec, node: str, *, install_interface: bool = True) -> None:
        self.spec = spec
        self.member = FarmMember(spec, node)
        self.transitions: collections.deque[Transition] = collections.deque(maxlen=100)
        self._interface = NodeInterface(spec) if install_interface else None
        self._arp = ArpResponder(spec.interface, spec.vip, spec.mac)
        self._installed: frozenset[int] | None = None
        self._installed_orphans: frozenset[int] = frozenset()
        self._dirty = trio.Event()
        self._lock = trio.Lock()
        self._counters: dict[str, int] = {}
        self._clock = time.monotonic  # the handover delays of member.py

    # ------------------------------------------------------------------ operator / manager

    @property
    def state(self) -> State:
        return self.member.state

    @property
    def announcement(self) -> tuple[State, Flag]:
        """State and flags to put in this node's heartbeats for the module."""
        return self.member.announcement

    @property
    def installed_buckets(self) -> frozenset[int] | None:
        """The buckets in the kernel's set now (None when nothing is installed)."""
        return self._installed

    @property
    def synced(self) -> bool:
        """True once the kernel's set holds what the membership gives this node."""
        return (self._installed, self._installed_orphans) == (
            self.member.my_buckets,
            self.member.orphans,
        )

    def drain(self) -> None:
        """Give every bucket away (WAIT); existing connections finish here."""
        self._record(self.member.drain())

    def undrain(self) -> None:
        self._record(self.member.undrain())

    def status(self) -> FarmStatus:
        m = self.member
        bmap = m.bucket_map
        counts = bmap.counts()
        peers = {p.name: p for p in (m.membership.peers if m.membership else ())}
        members = []
        for name, power in self.spec.powers:
            if name == m.node:
                alive, eligible = m.state != State.STOP, m.eligible
            else:
                view = peers.get(name)
                alive = bool(view and view.alive)
                eligible = bool(view and view.alive and view.eligible)
            members.append(MemberStatus(name, power, alive, eligible, counts.get(name, 0)))
        return FarmStatus(
            module=self.spec.module,
            node=m.node,
            state=m.state.name,
            reason=m.reason,
            drained=m.drained,
            vip=self.spec.vip,
            mac=self.spec.mac,
            mac_mode=self.spec.mac_mode,
            members=members,
            my_buckets=len(m.my_buckets),
            connections_served=self._counters.get("served", 0),
            foreign_packets=self._counters.get("foreign", 0),
            arp_requests=self._arp.requests,
            arp_replies=self._arp.replies,
        )

    # ------------------------------------------------------------------ the task

    async def run(
        self,
        updates: trio.abc.ReceiveChannel[Membership],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            self._record(self.member.start())
            if self._interface is not None:
                await trio.to_thread.run_sync(self._interface.setup)
            async with self._lock:
                buckets, orphans = self.member.my_buckets, self.member.orphans
                await ruleset.apply(self.spec, buckets, orphans)
                self._installed, self._installed_orphans = buckets, orphans
            async with trio.open_nursery() as nursery:
                await nursery.start(self._arp.run)
                nursery.start_soon(self._refresh_counters)
                nursery.start_soon(self._follow, updates, nursery.cancel_scope)
                task_status.started()
                while True:
                    due = self.member.next_due()
                    wait = math.inf if due is None else max(0.0, due - self._clock())
                    with trio.move_on_after(wait):
                        await self._dirty.wait()
                    self._dirty = trio.Event()
                    self.member.tick(self._clock())
                    await self._sync()
        finally:
            with trio.CancelScope(shield=True):
                await self._uninstall()

    async def _follow(
        self, updates: trio.abc.ReceiveChannel[Membership], scope: trio.CancelScope
    ) -> None:
        async with updates:
            async for membership in updates:
                self._record(self.member.update(membership, now=self._clock()))
                self._dirty.set()
        scope.cancel()  # the channel was closed: stop the module

    async def _sync(self) -> None:
        async with self._lock:
            wanted, orphans = self.member.my_buckets, self.member.orphans
            if (wanted, orphans) != (self._installed, self._installed_orphans):
                await ruleset.update_buckets(self.spec, wanted, orphans)
                log.info(
                    "farm %s: %d buckets (members %s)",
                    self.spec.module,
                    len(wanted),
                    ",".join(self.member.members),
                )
                self._installed, self._installed_orphans = wanted, orphans

    async def _refresh_counters(self) -> None:
        while True:
            with contextlib.suppress(ruleset.NftError, ValueError):
                self._counters = await ruleset.read_counters(self.spec)
            await trio.sleep(COUNTER_INTERVAL_S)

    async def refresh(self) -> FarmStatus:
        """Status with counters read now (the API's `status` can await this)."""
        with contextlib.suppress(ruleset.NftError, ValueError):
            self._counters = await ruleset.read_counters(self.spec)
        return self.status()

    async def _uninstall(self) -> None:
        self._record(self.member.stop("module stopped"))
        try:
            await ruleset.remove(self.spec)
        except ruleset.NftError:
            log.exception("farm %s: removing the nftables tables failed", self.spec.module)
        self._installed = None
        if self._interface is not None:
            try:
                self._interface.teardown()
            except OSError:
                log.exception("farm %s: interface teardown failed", self.spec.module)

    def _record(self, transition: Transition | None) -> None:
        if transition is not None:
            self.transitions.append(transition)
            log.info(
                "farm %s: %s -> %s (%s)",
                self.spec.module,
                transition.old.name,
                transition.new.name,
                transition.reason,
            )
            self._dirty.set()
