"""The farm member state machine: STOP, WAIT, UP, and which buckets this node serves.

Pure logic (no I/O, no clock): the service feeds it membership snapshots from the
heartbeat layer and operator commands, and applies the bucket set it answers.

- STOP: not started (or stopped by the operator). Nothing installed.
- WAIT: started, installed, but serving no new connection: no membership report yet, a
  checker with a farm action is
  failing, the operator drained the node, or the node is isolated (it lost every peer and
  every witness: it cannot tell a network split from the others' death, so it must not take
  their buckets). Connections it already serves go on (conntrack), new ones go elsewhere.
- UP: eligible; serves the buckets the map gives it.

The members are this node when eligible plus every configured peer that is alive and
announces itself eligible (UP with Flag.ELIGIBLE in its heartbeats). Every node computes the
map from the same members, so all agree once heartbeats agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from ha_runtime.farm.buckets import BucketMap, plan
from ha_runtime.farm.spec import FarmSpec
from ha_runtime.states import Flag, State


@dataclass(frozen=True)
class PeerView:
    """What the heartbeat layer knows about one peer of the module."""

    name: str
    alive: bool  # heard on at least one heartbeat network within the timeout
    eligible: bool = False  # announces UP with Flag.ELIGIBLE
    power: int | None = None  # the power it announces (informational; the map uses config)


@dataclass(frozen=True)
class Membership:
    """One snapshot fed to the farm: the peers, this node's health, the witness."""

    peers: tuple[PeerView, ...] = ()
    healthy: bool = True  # every checker with a farm action passes on this node
    health_reason: str = ""
    witness_ok: bool | None = None  # None: no witness configured, or not probed
    # Every peer went quiet and no witness answered since (ha_runtime.module, `isolated`): release
    # the buckets before the peers' timeout lets them take this node's share.
    isolated: bool = False


@dataclass(frozen=True)
class Transition:
    old: State
    new: State
    reason: str


@dataclass
class FarmMember:
    spec: FarmSpec
    node: str
    state: State = State.STOP
    reason: str = "not started"
    drained: bool = False
    membership: Membership | None = None  # None until the heartbeat layer reports
    started: bool = False

    def __post_init__(self) -> None:
        if self.node not in self.spec.nodes:
            raise ValueError(f"{self.node!r} is not a node of farm module {self.spec.module}")
        self._plan = plan(self.spec.power_map)
        self._last_map: BucketMap | None = None
        self._orphans: frozenset[int] = frozenset()
        self._now = 0.0
        # Buckets the map gave us from an owner still alive -> when we may take them.
        self._pending: dict[int, float] = {}
        self._reported = False  # a membership report has been evaluated

    # ------------------------------------------------------------------ inputs

    def start(self) -> Transition | None:
        self.started = True
        return self._evaluate()

    def stop(self, reason: str = "stopped by the operator") -> Transition | None:
        self.started = False
        return self._set(State.STOP, reason)

    def drain(self) -> Transition | None:
        self.drained = True
        return self._evaluate()

    def undrain(self) -> Transition | None:
        self.drained = False
        return self._evaluate()

    def update(self, membership: Membership, now: float | None = None) -> Transition | None:
        if now is not None:
            self._now = now
        self.membership = membership
        return self._evaluate()

    def tick(self, now: float) -> None:
        """Time passes: pending buckets whose handover delay is over become ours."""
        self._now = now
        self._pending = {b: t for b, t in self._pending.items() if t > now}

    def next_due(self) -> float | None:
        """When the next pending bucket becomes ours (None: nothing pending)."""
        return min(self._pending.values(), default=None)

    # ------------------------------------------------------------------ outputs

    @property
    def eligible(self) -> bool:
        return self.state == State.UP

    @property
    def announcement(self) -> tuple[State, Flag]:
        """What this node must announce in its heartbeats for this module."""
        return self.state, Flag.ELIGIBLE if self.eligible else Flag.NONE

    @property
    def members(self) -> tuple[str, ...]:
        peers = self.membership.peers if self.membership is not None else ()
        alive = {p.name for p in peers if p.alive and p.eligible}
        if self.eligible:
            alive.add(self.node)
        return tuple(n for n in self.spec.nodes if n in alive)

    @property
    def bucket_map(self) -> BucketMap:
        return self._plan.assign(self.members)

    @property
    def my_buckets(self) -> frozenset[int]:
        """The buckets this node answers now: its share of the map, less those still being
        handed over by an owner that is alive."""
        if not self.eligible:
            return frozenset()
        mine = self.bucket_map.buckets_of(self.node)
        return mine - {b for b, t in self._pending.items() if t > self._now}

    @property
    def orphans(self) -> frozenset[int]:
        """Buckets this node took from a node that died, while no other node is alive: no
        live node can hold a connection there (ours are accepted as established before), so
        a stray TCP segment in them is a dead node's connection; it is let through for our
        stack to reset, telling the client at once instead of after its retransmission
        timeout."""
        return self._orphans

    # ------------------------------------------------------------------ rules

    def _track_orphans(self) -> None:
        new = self.bucket_map
        mine = new.buckets_of(self.node) if self.eligible else frozenset()
        old = self._last_map
        alive = {p.name for p in self.membership.peers if p.alive} if self.membership else set()
        kept = self._orphans & mine
        gained: frozenset[int] = frozenset()
        if old is not None:
            gained = frozenset(
                b
                for b in mine
                if old.owners[b] not in (None, self.node) and old.owners[b] not in alive
            )
        # With another node alive, any segment may belong to a connection it kept when it
        # gave the bucket away (it served it while the bucket's usual owner was away): only
        # a node left alone can tell a dead connection from a live one.
        self._orphans = frozenset() if alive - {self.node} else kept | gained
        self._track_handover(old, mine, alive)
        self._last_map = new

    def _track_handover(self, old: BucketMap | None, mine: frozenset[int], alive: set[str]) -> None:
        """Two nodes must never answer one bucket. A bucket the map moves to us from a node
        that is alive (rejoining, rebalancing, or one that just stepped down) is still
        answered there until that node hears of the change; we take it handover_s later.
        A bucket of a dead node is taken at once: nobody else answers it."""
        pending = {b: t for b, t in self._pending.items() if b in mine}
        if self.membership is not None and not self._reported:
            # The first report (the service just started): the others served without us.
            others = tuple(n for n in self.members if n != self.node)
            old = self._plan.assign(others)
            self._reported = True
        if old is not None and self.spec.handover_s > 0:
            for b in mine:
                owner = old.owners[b]
                if b not in pending and owner not in (None, self.node) and owner in alive:
                    pending[b] = self._now + self.spec.handover_s
        self._pending = pending

    def _evaluate(self) -> Transition | None:
        transition = self._decide()
        self._track_orphans()
        return transition

    def _decide(self) -> Transition | None:
        if not self.started:
            return self._set(State.STOP, self.reason if self.state == State.STOP else "stopped")
        m = self.membership
        if m is None:
            return self._set(State.WAIT, "waiting for the first membership report")
        if self.drained:
            return self._set(State.WAIT, "drained by the operator")
        if not m.healthy:
            return self._set(State.WAIT, f"checker failing: {m.health_reason or 'unhealthy'}")
        peers_alive = any(p.alive for p in m.peers)
        if m.isolated or (self.spec.witness and not peers_alive and m.witness_ok is False):
            return self._set(State.WAIT, "isolated: every peer and every witness lost")
        return self._set(State.UP, "serving" if peers_alive else "serving alone (no peer)")

    def _set(self, state: State, reason: str) -> Transition | None:
        old = self.state
        self.reason = reason
        if state == old:
            return None
        self.state = state
        return Transition(old, state, reason)
