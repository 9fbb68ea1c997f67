"""What the heartbeats tell about each peer of each module, and what this node announces.

`PeerTable` is fed by `service.HeartbeatService` with every heartbeat that passed the
checks (authentic, fresh, from a known node for a known module) and read by the modules
(`mirror.module`, `farm.module`) as one `PeerView` per peer: alive or not, its last state,
flags and data generation. A peer is alive while at least one network delivered a valid
heartbeat within the module's timeout.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ha_runtime.generation import Generation
from ha_runtime.heartbeat.packet import Heartbeat
from ha_runtime.states import Flag, State

NO_GENERATION = Generation()


class PeerStatus(enum.Enum):
    STARTING = "starting"  # we have not listened for a full timeout since boot yet
    ALIVE = "alive"  # heard on at least one network within the timeout
    LOST = "lost"  # heard since boot, then silent on every network for the timeout
    NEVER = "never"  # not heard at all since boot, for longer than the timeout


@dataclass(frozen=True)
class PeerView:
    status: PeerStatus
    state: State | None = None  # last state heard (None if never heard)
    flags: Flag = Flag.NONE
    generation: Generation = NO_GENERATION

    @property
    def alive(self) -> bool:
        return self.status is PeerStatus.ALIVE

    @property
    def primary(self) -> bool:
        return self.alive and self.state is not None and self.state.is_primary


@dataclass(frozen=True)
class LocalAnnounce:
    """What this node says about one module in its next heartbeat."""

    state: State
    flags: Flag
    generation: Generation


@dataclass
class _PeerTrack:
    last_rx: dict[str, float] = field(default_factory=dict)  # network -> monotonic time
    last: Heartbeat | None = None


@dataclass(frozen=True)
class ModuleStream:
    name: str
    peers: tuple[str, ...]
    interval_s: float
    timeout_s: float


class PeerTable:
    """Liveness and last state of each (module, peer), fed by valid heartbeats."""

    def __init__(self, streams: dict[str, ModuleStream], clock: Callable[[], float]) -> None:
        self._streams = streams
        self._clock = clock
        self._started = clock()
        self._tracks: dict[tuple[str, str], _PeerTrack] = {}
        self.changed: dict[str, trio.Event] = {m: trio.Event() for m in streams}

    def record(self, hb: Heartbeat) -> None:
        track = self._tracks.setdefault((hb.module, hb.node), _PeerTrack())
        before = track.last
        track.last_rx[hb.network] = self._clock()
        track.last = hb
        # Wake the module at once on a state or flag change (swap, failover), so
        # reaction time is not bound to the module's polling period.
        if before is None or (before.state, before.flags, before.generation) != (
            hb.state,
            hb.flags,
            hb.generation,
        ):
            self.notify(hb.module)

    def notify(self, module: str) -> None:
        ev = self.changed.get(module)
        if ev is not None:
            ev.set()
            self.changed[module] = trio.Event()

    def view(self, module: str, peer: str) -> PeerView:
        stream = self._streams[module]
        now = self._clock()
        track = self._tracks.get((module, peer))
        if track is None or track.last is None:
            status = (
                PeerStatus.STARTING if now - self._started < stream.timeout_s else PeerStatus.NEVER
            )
            return PeerView(status)
        fresh = any(now - t < stream.timeout_s for t in track.last_rx.values())
        hb = track.last
        return PeerView(
            PeerStatus.ALIVE if fresh else PeerStatus.LOST,
            hb.state,
            hb.flags,
            Generation(hb.generation, hb.history),
        )

    def last_heard(self, module: str, peer: str) -> float | None:
        """When a valid heartbeat of this peer last arrived on any network (None: never)."""
        track = self._tracks.get((module, peer))
        if track is None or not track.last_rx:
            return None
        return max(track.last_rx.values())

    def networks_alive(self, module: str, peer: str) -> list[str]:
        track = self._tracks.get((module, peer))
        if track is None:
            return []
        now = self._clock()
        timeout = self._streams[module].timeout_s
        return sorted(n for n, t in track.last_rx.items() if now - t < timeout)
