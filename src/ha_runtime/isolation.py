"""Whether this node may be the one cut off: its peers' silence against the witness's answers.

Every module kind (`mirror.module`, `farm.module`) owns one `IsolationWatch` when its module
configures a witness; `isolated` feeds the mirror decision and the farm membership.

A node cut from every network must stop serving *before* its peer's heartbeat timeout
lets the peer take over, or both serve for a while. So isolation is judged early:
once every peer has been silent for a third of the timeout, the witness is probed at
once, in a window short enough to release the VIP or buckets well inside the timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ha_runtime import checkers
from ha_runtime.config import ModuleConfig
from ha_runtime.heartbeat.peers import PeerTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WitnessProbe:
    started: float  # clock() when the echoes left
    ok: bool


class IsolationWatch:
    def __init__(
        self,
        *,
        module: ModuleConfig,
        peers: PeerTable,
        peer_names: Callable[[], tuple[str, ...]],
        clock: Callable[[], float],
        wake: Callable[[], None],
    ) -> None:
        self.m = module
        self.peers = peers
        self._peer_names = peer_names
        self._clock = clock
        self._wake = wake
        self.witness_ok: bool | None = None if not module.witness else True
        self.probe: WitnessProbe | None = None  # the latest-sent probe that finished
        # When a probe answered after one that did not: this node's own cut may just have
        # healed, and the peers' silence during it says nothing about them yet.
        self.back_at: float | None = None

    def start(self, nursery: trio.Nursery) -> None:
        if self.m.witness:
            nursery.start_soon(self._witness_loop)
            nursery.start_soon(self.watch)

    @property
    def _suspect_after_s(self) -> float:
        return self.m.heartbeat.timeout_ms / 1000 / 3

    @property
    def _window_s(self) -> float:
        return min(1.0, max(0.1, self.m.heartbeat.timeout_ms / 1000 / 6))

    def _quiet_since(self) -> float | None:
        """When the last heartbeat of any peer arrived, if every peer heard since boot has
        been silent for the suspicion delay; None while one is heard."""
        heard = [self.peers.last_heard(self.m.name, p) for p in self._peer_names()]
        times = [t for t in heard if t is not None]
        if not times:
            return None  # never heard: nobody can be racing us for what we serve
        last = max(times)
        return last if self._clock() - last >= self._suspect_after_s else None

    def fresh(self) -> bool:
        """A witness probe sent once the peers' silence became suspicious has finished
        (answered or not). One sent earlier, even after their last heartbeat, may have left
        just before the cut that silenced them (timeout >= 3 x interval, so a third of the
        timeout without a heartbeat means the cut, if any, came before): it tells nothing.
        Found by the fault campaign: the periodic probe answered a moment before the cut,
        the watch took it as the verdict and the node released after the peer took over."""
        quiet = self._quiet_since()
        probe = self.probe
        return (
            quiet is not None
            and probe is not None
            # the same form as _quiet_since's test, so a probe sent by the watch always counts
            and probe.started - quiet >= self._suspect_after_s
        )

    @property
    def isolated(self) -> bool:
        """Every peer is quiet and no witness answered a probe sent since: this node may be
        the one cut off, so it must release what it serves before a peer takes it over."""
        probe = self.probe
        if not self.m.witness or probe is None:
            return False
        if self.fresh() and not probe.ok:
            return True
        # Reconnected: the witness answers again, the peers are still quiet. They may have
        # taken over while we were cut off, and their heartbeats may not have arrived yet:
        # still isolated until they are heard, or for one heartbeat timeout (then they are
        # really gone). Found by the fault campaign: an isolated node whose witness came
        # back first took over with its old data while its peer was primary.
        quiet = self._quiet_since()
        back = self.back_at
        return (
            quiet is not None
            and back is not None
            and back > quiet
            and self._clock() - back < self.m.heartbeat.timeout_ms / 1000
        )

    async def probe_witness(self) -> bool:
        started = self._clock()
        ok = await checkers.any_reachable(self.m.witness, self._window_s, attempts=4)
        latest = self.probe
        # Two probes may overlap (periodic and isolation watch): the later-sent one counts.
        if latest is None or started >= latest.started:
            self.probe = WitnessProbe(started, ok)
            if ok != self.witness_ok:
                log.info("%s: witness %s", self.m.name, "reachable" if ok else "unreachable")
                if ok:
                    self.back_at = self._clock()
                self.witness_ok = ok
                self._wake()
            elif not ok:
                self._wake()  # an unanswered probe may make this node isolated now
        return ok

    async def _witness_loop(self) -> None:
        period = max(1.0, self.m.heartbeat.interval_ms / 1000)
        while True:
            await self.probe_witness()
            await trio.sleep(period)

    async def watch(self) -> None:
        """Probe the witness at once when every peer has gone quiet (see the top)."""
        tick = max(0.02, min(self.m.heartbeat.interval_ms / 1000, self._window_s) / 2)
        while True:
            if self._quiet_since() is not None and not self.fresh():
                await self.probe_witness()
            await trio.sleep(tick)
