"""The mirror state machine as a pure function: what this node should be, and why.

Everything the decision needs is in `Inputs` (local state, data generation, the peer's
last heartbeat, operator requests, checker verdicts); nothing here touches a socket, a
clock or a file, so every rule is unit-tested table-driven and with generated inputs.
`module.py` applies the `Decision` (scripts, VIP, generation file, events).

Safety rules (docs/states in DESIGN.md):
- never two primaries when both see each other: a node only takes the role from a peer
  that is not primary, and two candidates are ordered by the same total order on both
  sides (`_outranks`), so exactly one wins;
- a node whose data is not known to be at least as new as its peer's never becomes
  primary on its own (only `hactl prim` forces it);
- with a witness, losing the peer and every witness means WAIT, never ALONE; a primary
  that may be isolated releases before the peer's timeout, not after it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ha_runtime.generation import GenRecord, Relation, compare
from ha_runtime.heartbeat.peers import PeerStatus, PeerView
from ha_runtime.states import Flag, State


@dataclass(frozen=True)
class Inputs:
    node: str
    peer_name: str
    default_primary: str
    state: State
    record: GenRecord
    peer: PeerView
    admin_stopped: bool = False
    blocked: str | None = None  # a `wait` checker fails: why
    yielding: str | None = None  # a checker demanded failover: why
    handover: bool = False  # we are handing the role over (swap in progress)
    swap_requested: bool = False  # the operator asked this node for a swap
    witness_ok: bool | None = None  # None: no witness configured
    # The peer has gone quiet and no witness answered since: this node may be the one cut
    # off, and the peer will take over when its timeout expires (ha_runtime.module, `isolated`).
    isolated: bool = False
    force_primary: bool = False  # `hactl prim`
    accept_peer_data: bool = False  # `hactl second` on a node holding newer/diverged data
    failback_auto: bool = False
    failback_allowed: bool = True  # runtime veto (e.g. restart budget exhausted)
    # Replicated directories (None: the module has none). Primary: every directory
    # replicates synchronously to the peer. Secondary: every directory was declared in sync
    # by the primary at the primary's current generation.
    replica_sync: bool | None = None
    # The module's data can be quarantined (it has replicated directories): on a split
    # brain the yielding side becomes SECOND and its diverging files are kept aside.
    quarantine_on_split: bool = False

    @property
    def primary(self) -> bool:
        return self.state.is_primary

    @property
    def eligible(self) -> bool:
        return not self.admin_stopped and self.blocked is None and self.yielding is None

    @property
    def relation(self) -> Relation:
        return compare(self.record.generation, self.peer.generation)


@dataclass(frozen=True)
class Decision:
    state: State
    reason: str
    flags: Flag = Flag.NONE
    new_generation: bool = False  # start a new data era (we write without a replica)
    adopt_peer_generation: bool = False  # we follow the peer's copy
    start_handover: bool = False  # we just released the role for a swap
    peer_outdated: bool | None = None  # new value for the persisted flag, None: unchanged


def decide(i: Inputs) -> Decision:
    d = _decide_state(i)
    if d.state is State.PRIM and (
        i.replica_sync is False or (i.replica_sync is not None and not i.primary)
    ):
        # PRIM promises a protected copy on the peer: without replication it is ALONE (and
        # a node taking the role has not started replicating yet: ALONE first, then PRIM).
        d = replace(d, state=State.ALONE, reason=f"{d.reason}; replication not in sync")
    flags = Flag.NONE
    if i.eligible and d.state is not State.STOP:
        flags |= Flag.ELIGIBLE
    if i.handover or d.start_handover:
        flags |= Flag.HANDOVER
    if d.state is State.SECOND and _wants_swap(i):
        flags |= Flag.SWAP_REQUEST
    # A new era whenever we start writing without a replica, and on the very first
    # promotion, so that a copy that has ever served is never mistaken for a blank one.
    new_gen = (d.state is State.ALONE and i.state is not State.ALONE) or (
        d.state.is_primary and i.record.generation.empty
    )
    # A secondary follows the primary's generation only once its copy equals the primary's:
    # until then it stays older, so it can never become primary on its own.
    adopt = d.adopt_peer_generation and i.replica_sync is not False
    outdated = d.peer_outdated
    if d.state is State.ALONE and new_gen:
        outdated = True
    elif d.state is State.PRIM or adopt:
        outdated = False
    return Decision(
        state=d.state,
        reason=d.reason,
        flags=flags,
        new_generation=new_gen,
        adopt_peer_generation=adopt,
        start_handover=d.start_handover,
        peer_outdated=outdated,
    )


def _decide_state(i: Inputs) -> Decision:
    if i.admin_stopped:
        return Decision(State.STOP, "stopped by operator")
    peer = i.peer
    if i.force_primary and not peer.primary:
        if i.primary:
            return Decision(i.state, "primary (forced by operator)")
        return Decision(State.ALONE, "primary forced by operator (hactl prim)")
    if i.isolated and i.primary:
        return Decision(
            State.WAIT,
            "peer quiet and no witness answers: this node may be the isolated one, so it"
            " releases the application before the peer's timeout lets the peer take over",
        )
    if not peer.alive and (i.witness_ok is False or i.isolated):
        return Decision(
            State.WAIT,
            "peer and every witness unreachable, or reachable again only now: this node may"
            " be the isolated one, so it does not run the application",
        )
    if i.blocked is not None:
        return Decision(State.WAIT, f"not eligible: {i.blocked}")
    if i.yielding is not None:
        if peer.primary and i.relation in (Relation.SAME, Relation.PEER_NEWER):
            return Decision(
                State.SECOND,
                f"peer took over after failover ({i.yielding})",
                adopt_peer_generation=True,
            )
        return Decision(State.WAIT, f"failover requested: {i.yielding}")
    if peer.alive:
        return _with_live_peer(i)
    return _without_peer(i)


def _with_live_peer(i: Inputs) -> Decision:
    peer, rel = i.peer, i.relation
    if i.primary:
        if peer.primary:
            return _two_primaries(i)
        if (i.swap_requested or Flag.SWAP_REQUEST in peer.flags) and peer_ready(i):
            return Decision(
                State.SECOND,
                f"switchover: handing the module over to {i.peer_name}",
                start_handover=True,
            )
        if peer.state is State.SECOND and rel is Relation.SAME and i.replica_sync is not False:
            return Decision(State.PRIM, f"{i.peer_name} is SECOND and in sync")
        if peer.state is State.SECOND and i.replica_sync is not None:
            return Decision(
                State.ALONE, f"{i.peer_name} is SECOND, replication not in sync (resyncing)"
            )
        return Decision(State.ALONE, f"{i.peer_name} is {_name(peer.state)}, not replicating")
    if peer.primary:
        if rel in (Relation.SAME, Relation.PEER_NEWER) or i.accept_peer_data:
            why = (
                " (operator accepted the peer's data)"
                if rel is not Relation.SAME and i.accept_peer_data
                else ""
            )
            return Decision(
                State.SECOND, f"{i.peer_name} is primary{why}", adopt_peer_generation=True
            )
        if rel is Relation.DIVERGED and i.quarantine_on_split:
            return _split_brain_second(i)
        if rel is Relation.LOCAL_NEWER:
            return Decision(
                State.WAIT,
                f"{i.peer_name} is primary with older data than ours: not following it"
                " (hactl second MODULE accepts the peer's data)",
            )
        return Decision(
            State.WAIT,
            f"split brain: our data and {i.peer_name}'s diverged; {i.peer_name} is primary"
            " (hactl second MODULE accepts the peer's data)",
        )
    # Neither is primary: the same order on both sides picks at most one candidate.
    if _outranks(i):
        if (
            peer.state is State.SECOND
            and rel is Relation.SAME
            and not i.record.generation.empty
            and i.replica_sync is not False
        ):
            return Decision(State.PRIM, f"taking the primary role, {i.peer_name} is SECOND in sync")
        return Decision(
            State.ALONE, f"taking the primary role, {i.peer_name} is {_name(peer.state)}"
        )
    if Flag.ELIGIBLE in peer.flags and rel in (Relation.SAME, Relation.PEER_NEWER):
        return Decision(
            State.SECOND, f"{i.peer_name} takes the primary role", adopt_peer_generation=True
        )
    if rel is Relation.DIVERGED:
        return Decision(State.WAIT, f"split brain: our data and {i.peer_name}'s diverged")
    if rel is Relation.PEER_NEWER:
        return Decision(
            State.WAIT, f"{i.peer_name} holds newer data but is {_name(peer.state)}, not eligible"
        )
    return Decision(State.WAIT, f"waiting: {i.peer_name} is {_name(peer.state)}")


def _two_primaries(i: Inputs) -> Decision:
    """Both primary (after a partition healed): the same order on both sides keeps one."""
    rel = i.relation
    if _primary_outranks(i):
        return Decision(i.state, f"{i.peer_name} is also primary and must yield ({rel.value})")
    if rel in (Relation.SAME, Relation.PEER_NEWER):
        return Decision(
            State.SECOND,
            f"{i.peer_name} is also primary and outranks us: yielding",
            adopt_peer_generation=True,
        )
    if rel is Relation.DIVERGED and i.quarantine_on_split:
        return _split_brain_second(i)
    return Decision(
        State.WAIT,
        f"SPLIT BRAIN: both nodes were primary and the data diverged; {i.peer_name} keeps the"
        " role, the operator must decide (hactl second MODULE accepts the peer's data)",
    )


def _split_brain_second(i: Inputs) -> Decision:
    """Split brain on a replicated module: yield, keeping our diverging files aside."""
    return Decision(
        State.SECOND,
        f"SPLIT BRAIN: our data and {i.peer_name}'s diverged and {i.peer_name} keeps the"
        " primary role; our diverging files are quarantined by a full resync"
        " (hactl status MODULE shows where; the operator decides)",
        adopt_peer_generation=True,
    )


def _without_peer(i: Inputs) -> Decision:
    peer = i.peer
    if i.primary:
        return Decision(State.ALONE, f"{i.peer_name} silent on every network")
    if peer.status is PeerStatus.STARTING:
        return Decision(State.WAIT, f"listening for {i.peer_name}'s heartbeats")
    gen = i.record.generation
    if peer.status is PeerStatus.LOST:
        rel = i.relation
        if rel in (Relation.SAME, Relation.LOCAL_NEWER):
            return Decision(
                State.ALONE,
                f"{i.peer_name} lost on every network; our data is up to date"
                f" (generation {gen.short()})",
            )
        return Decision(
            State.WAIT,
            f"{i.peer_name} lost but our data is not known to be up to date ({rel.value})",
        )
    # Never heard since boot.
    if gen.empty:
        if i.node == i.default_primary:
            return Decision(State.ALONE, "first start with no history: default primary")
        return Decision(
            State.WAIT, f"first start: waiting for {i.default_primary} (default primary)"
        )
    if i.record.peer_outdated:
        return Decision(
            State.ALONE,
            f"{i.peer_name} not seen since boot; we were primary alone, our data is newest",
        )
    return Decision(
        State.WAIT,
        f"{i.peer_name} not seen since boot: cannot prove our data is the newest"
        " (hactl prim MODULE forces this node primary)",
    )


def _outranks(i: Inputs) -> bool:
    """Does this node win the primary role over a peer that is not primary either?

    Antisymmetric given consistent views: data first, then a handover in progress, then
    the default primary, then the node name.
    """
    if not i.eligible:
        return False
    peer_eligible = Flag.ELIGIBLE in i.peer.flags
    rel = i.relation
    if not peer_eligible:
        return rel in (Relation.SAME, Relation.LOCAL_NEWER)
    if rel is not Relation.SAME:
        return rel is Relation.LOCAL_NEWER
    peer_handover = Flag.HANDOVER in i.peer.flags
    if i.handover != peer_handover:
        return peer_handover
    return _preferred(i)


def _primary_outranks(i: Inputs) -> bool:
    rel = i.relation
    if rel is Relation.LOCAL_NEWER:
        return True
    if rel is Relation.PEER_NEWER:
        return False
    return _preferred(i)


def _preferred(i: Inputs) -> bool:
    if i.default_primary in (i.node, i.peer_name):
        return i.node == i.default_primary
    return i.node < i.peer_name


def peer_ready(i: Inputs) -> bool:
    """Can the peer take the role over right now without losing anything?"""
    p = i.peer
    return (
        p.alive
        and p.state is State.SECOND
        and Flag.ELIGIBLE in p.flags
        and Flag.HANDOVER not in p.flags
        and i.relation is Relation.SAME
    )


def _wants_swap(i: Inputs) -> bool:
    if not (i.eligible and i.peer.state is State.PRIM and i.relation is Relation.SAME):
        return False
    if i.swap_requested:
        return True
    return i.failback_auto and i.failback_allowed and i.node == i.default_primary


def swap_refusal(i: Inputs) -> str | None:
    """Why `hactl swap` cannot be done now (None: it can). Nothing is changed on refusal."""
    p = i.peer
    if i.admin_stopped:
        return "module is stopped on this node"
    if not p.alive:
        return f"{i.peer_name} is not reachable: no node to hand over to"
    if i.relation is not Relation.SAME:
        return f"the two copies are not in sync ({i.relation.value}): a switchover could lose data"
    if i.state is State.PRIM:
        if not peer_ready(i):
            why = "not eligible" if Flag.ELIGIBLE not in p.flags else _name(p.state)
            return f"{i.peer_name} is not ready to take over ({why}); nothing changed"
        return None
    if i.state is State.SECOND:
        if p.state is not State.PRIM:
            return f"{i.peer_name} is {_name(p.state)}, not PRIM; nothing changed"
        if not i.eligible:
            return (
                f"this node is not ready to take over ({i.blocked or i.yielding}); nothing changed"
            )
        return None
    return (
        f"this node is {i.state.name}: swap needs one PRIM and one SECOND in sync; nothing changed"
    )


def _name(state: State | None) -> str:
    return state.name if state is not None else "unknown"
