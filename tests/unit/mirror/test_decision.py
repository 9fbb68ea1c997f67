"""The mirror state machine: table-driven cases and generated invariants."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.generation import Generation, GenRecord, Relation, compare
from ha_runtime.heartbeat.peers import PeerStatus, PeerView
from ha_runtime.mirror.decision import Inputs, decide, swap_refusal
from ha_runtime.states import Flag, State

G1 = Generation(0x11, ())
G2 = Generation(0x22, (0x11,))  # descends from G1
G3 = Generation(0x33, (0x11,))  # also descends from G1: diverged from G2
E = Flag.ELIGIBLE


def inputs(
    node: str = "node1",
    state: State = State.WAIT,
    gen: Generation = G1,
    peer: PeerView | None = None,
    **kw: object,
) -> Inputs:
    peer_name = "node2" if node == "node1" else "node1"
    base = Inputs(
        node=node,
        peer_name=peer_name,
        default_primary="node1",
        state=state,
        record=GenRecord(gen),
        peer=peer or PeerView(PeerStatus.ALIVE, State.SECOND, E, gen),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def alive(state: State, gen: Generation = G1, flags: Flag = E) -> PeerView:
    return PeerView(PeerStatus.ALIVE, state, flags, gen)


CASES = [
    # (description, inputs, expected state)
    ("operator stop wins", inputs(state=State.PRIM, admin_stopped=True), State.STOP),
    (
        "fresh pair, default primary",
        inputs("node1", gen=Generation(), peer=alive(State.WAIT, Generation())),
        State.ALONE,
    ),
    (
        "fresh pair, other node follows",
        inputs("node2", gen=Generation(), peer=alive(State.WAIT, Generation())),
        State.SECOND,
    ),
    (
        "fresh, alone, default primary",
        inputs("node1", gen=Generation(), peer=PeerView(PeerStatus.NEVER)),
        State.ALONE,
    ),
    (
        "fresh, alone, not default",
        inputs("node2", gen=Generation(), peer=PeerView(PeerStatus.NEVER)),
        State.WAIT,
    ),
    ("startup grace", inputs(peer=PeerView(PeerStatus.STARTING)), State.WAIT),
    (
        "secondary fails over in sync",
        inputs("node2", State.SECOND, G1, PeerView(PeerStatus.LOST, State.PRIM, E, G1)),
        State.ALONE,
    ),
    (
        "behind secondary does not fail over",
        inputs("node2", State.SECOND, G1, PeerView(PeerStatus.LOST, State.PRIM, E, G2)),
        State.WAIT,
    ),
    (
        "witness lost too: WAIT",
        inputs(
            "node2",
            State.SECOND,
            G1,
            PeerView(PeerStatus.LOST, State.PRIM, E, G1),
            witness_ok=False,
        ),
        State.WAIT,
    ),
    (
        "witness reachable: ALONE",
        inputs(
            "node2", State.SECOND, G1, PeerView(PeerStatus.LOST, State.PRIM, E, G1), witness_ok=True
        ),
        State.ALONE,
    ),
    (
        "isolated primary stops",
        inputs(
            "node1",
            State.PRIM,
            G1,
            PeerView(PeerStatus.LOST, State.SECOND, E, G1),
            witness_ok=False,
        ),
        State.WAIT,
    ),
    (
        "primary quiet peer, no witness answer: releases before the peer's timeout",
        inputs("node1", State.PRIM, G1, alive(State.SECOND), witness_ok=False, isolated=True),
        State.WAIT,
    ),
    (
        "secondary quiet peer, no witness answer: nothing to release, waits for the timeout",
        inputs("node2", State.SECOND, G1, alive(State.PRIM), witness_ok=False, isolated=True),
        State.SECOND,
    ),
    (
        "primary keeps running alone",
        inputs("node1", State.PRIM, G1, PeerView(PeerStatus.LOST, State.SECOND, E, G1)),
        State.ALONE,
    ),
    ("primary with synced peer", inputs("node1", State.ALONE, G1, alive(State.SECOND)), State.PRIM),
    (
        "primary with waiting peer",
        inputs("node1", State.PRIM, G1, alive(State.WAIT, G1, Flag.NONE)),
        State.ALONE,
    ),
    (
        "returning node with older data follows",
        inputs("node1", State.WAIT, G1, alive(State.ALONE, G2)),
        State.SECOND,
    ),
    (
        "returning node never promotes over newer peer",
        inputs("node1", State.WAIT, G1, alive(State.WAIT, G2)),
        State.SECOND,
    ),
    (
        "newer peer not eligible: wait",
        inputs("node1", State.WAIT, G1, alive(State.WAIT, G2, Flag.NONE)),
        State.WAIT,
    ),
    (
        "peer primary with older data: wait",
        inputs("node1", State.WAIT, G2, alive(State.ALONE, G1)),
        State.WAIT,
    ),
    (
        "operator accepts peer data",
        inputs("node1", State.WAIT, G2, alive(State.ALONE, G1), accept_peer_data=True),
        State.SECOND,
    ),
    (
        "diverged, peer primary: wait",
        inputs("node1", State.WAIT, G2, alive(State.ALONE, G3)),
        State.WAIT,
    ),
    (
        "two primaries, default keeps",
        inputs("node1", State.ALONE, G2, alive(State.ALONE, G3)),
        State.ALONE,
    ),
    (
        "two primaries, other yields to WAIT when diverged",
        inputs("node2", State.ALONE, G3, alive(State.ALONE, G2)),
        State.WAIT,
    ),
    (
        "two primaries, newer keeps",
        inputs("node2", State.ALONE, G2, alive(State.ALONE, G1)),
        State.ALONE,
    ),
    (
        "two primaries, older yields",
        inputs("node1", State.ALONE, G1, alive(State.ALONE, G2)),
        State.SECOND,
    ),
    (
        "unseen peer, no proof: wait",
        inputs("node1", State.WAIT, G1, PeerView(PeerStatus.NEVER)),
        State.WAIT,
    ),
    (
        "unseen peer, peer outdated: alone",
        replace(
            inputs("node2", State.WAIT, G2, PeerView(PeerStatus.NEVER)), record=GenRecord(G2, True)
        ),
        State.ALONE,
    ),
    (
        "forced primary",
        inputs("node1", State.WAIT, G1, PeerView(PeerStatus.NEVER), force_primary=True),
        State.ALONE,
    ),
    (
        "forced primary ignored while peer primary",
        inputs("node1", State.SECOND, G1, alive(State.PRIM), force_primary=True),
        State.SECOND,
    ),
    ("wait checker blocks", inputs("node1", State.PRIM, blocked="interface lan0 down"), State.WAIT),
    ("failover checker yields", inputs("node1", State.PRIM, yielding="app failed"), State.WAIT),
    (
        "yielding follows new primary",
        inputs("node1", State.WAIT, G1, alive(State.ALONE, G2), yielding="app"),
        State.SECOND,
    ),
    ("swap on primary hands over", inputs("node1", State.PRIM, swap_requested=True), State.SECOND),
    (
        "peer swap request honoured",
        inputs("node1", State.PRIM, G1, alive(State.SECOND, G1, E | Flag.SWAP_REQUEST)),
        State.SECOND,
    ),
    (
        "handover peer loses the contest",
        inputs("node2", State.SECOND, G1, alive(State.SECOND, G1, E | Flag.HANDOVER)),
        State.PRIM,
    ),
    (
        "handing-over node yields",
        inputs("node1", State.SECOND, G1, alive(State.SECOND), handover=True),
        State.SECOND,
    ),
    (
        "handover falls back if peer cannot take",
        inputs("node1", State.SECOND, G1, alive(State.SECOND, G1, Flag.NONE), handover=True),
        State.PRIM,
    ),
]


@pytest.mark.parametrize(("desc", "inp", "expected"), CASES, ids=[c[0] for c in CASES])
def test_decision_table(desc: str, inp: Inputs, expected: State) -> None:
    d = decide(inp)
    assert d.state is expected, f"{desc}: {d.reason}"
    assert d.reason


def test_entering_alone_starts_a_new_generation_and_marks_peer_outdated() -> None:
    d = decide(inputs("node2", State.SECOND, G1, PeerView(PeerStatus.LOST, State.PRIM, E, G1)))
    assert d.new_generation and d.peer_outdated is True
    d = decide(inputs("node1", State.ALONE, G1, alive(State.SECOND)))
    assert d.state is State.PRIM and not d.new_generation and d.peer_outdated is False


def test_auto_failback_requests_swap_from_preferred_node() -> None:
    d = decide(inputs("node1", State.SECOND, G1, alive(State.PRIM), failback_auto=True))
    assert d.state is State.SECOND and Flag.SWAP_REQUEST in d.flags
    d = decide(inputs("node1", State.SECOND, G1, alive(State.PRIM)))
    assert Flag.SWAP_REQUEST not in d.flags


def test_swap_refused_when_peer_not_ready() -> None:
    assert swap_refusal(inputs("node1", State.PRIM, G1, alive(State.WAIT, G1, Flag.NONE)))
    assert swap_refusal(
        inputs("node1", State.PRIM, G1, PeerView(PeerStatus.LOST, State.SECOND, E, G1))
    )
    assert swap_refusal(inputs("node1", State.ALONE, G2, alive(State.SECOND, G1)))
    assert swap_refusal(inputs("node1", State.PRIM, G1, alive(State.SECOND))) is None
    assert swap_refusal(inputs("node2", State.SECOND, G1, alive(State.PRIM))) is None


# --------------------------------------------------------------------------- invariants

gens = st.sampled_from([Generation(), G1, G2, G3])
states = st.sampled_from([State.STOP, State.WAIT, State.ALONE, State.PRIM, State.SECOND])


@st.composite
def node_facts(draw: st.DrawFn) -> dict[str, object]:
    return {
        "state": draw(states),
        "gen": draw(gens),
        "admin_stopped": draw(st.booleans()),
        "blocked": draw(st.sampled_from([None, "checker"])),
        "yielding": draw(st.sampled_from([None, "checker"])),
        "handover": draw(st.booleans()),
        "swap_requested": draw(st.booleans()),
        "failback_auto": draw(st.booleans()),
        "witness_ok": draw(st.sampled_from([None, True, False])),
        "accept_peer_data": draw(st.booleans()),
    }


def _flags(f: dict[str, object]) -> Flag:
    fl = Flag.NONE
    if not f["admin_stopped"] and f["blocked"] is None and f["yielding"] is None:
        fl |= Flag.ELIGIBLE
    if f["handover"]:
        fl |= Flag.HANDOVER
    return fl


def _view(name: str, me: dict[str, object], other: dict[str, object]) -> Inputs:
    peer = PeerView(PeerStatus.ALIVE, other["state"], _flags(other), other["gen"])  # type: ignore[arg-type]
    kw = {k: v for k, v in me.items() if k not in ("state", "gen")}
    return inputs(name, me["state"], me["gen"], peer, **kw)  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(node_facts(), node_facts())
def test_never_two_primaries_with_consistent_heartbeats(
    a: dict[str, object], b: dict[str, object]
) -> None:
    """Each node decides on the other's true state: the pair never ends with two primaries
    unless both already were (a healed partition), in which case at most one stays."""
    da = decide(_view("node1", a, b))
    db = decide(_view("node2", b, a))
    both_were = a["state"] in (State.PRIM, State.ALONE) and b["state"] in (State.PRIM, State.ALONE)
    if not both_were:
        # A node that was not primary only becomes primary if the other was not primary.
        if da.state.is_primary and a["state"] not in (State.PRIM, State.ALONE):
            assert b["state"] not in (State.PRIM, State.ALONE)
        if db.state.is_primary and b["state"] not in (State.PRIM, State.ALONE):
            assert a["state"] not in (State.PRIM, State.ALONE)
        newly_a = da.state.is_primary and not a["state"] in (State.PRIM, State.ALONE)  # noqa: E713
        newly_b = db.state.is_primary and not b["state"] in (State.PRIM, State.ALONE)  # noqa: E713
        assert not (newly_a and newly_b)
    else:
        assert not (da.state.is_primary and db.state.is_primary)


@settings(max_examples=400, deadline=None)
@given(node_facts(), gens, st.sampled_from(list(PeerStatus)), states, st.booleans())
def test_stale_generation_never_promotes(
    me: dict[str, object],
    peer_gen: Generation,
    status: PeerStatus,
    peer_state: State,
    outdated: bool,
) -> None:
    me = dict(me, force_primary=False)
    peer = PeerView(status, peer_state, Flag.ELIGIBLE, peer_gen)
    inp = _view("node1", me, me)
    inp = replace(inp, peer=peer, record=GenRecord(me["gen"], outdated), accept_peer_data=False)  # type: ignore[arg-type]
    d = decide(inp)
    if not inp.primary and d.state.is_primary:
        rel = compare(inp.record.generation, peer_gen)
        if status is PeerStatus.NEVER:
            assert inp.record.generation.empty or outdated
        else:
            assert status is not PeerStatus.STARTING
            assert rel in (Relation.SAME, Relation.LOCAL_NEWER), d.reason


@settings(max_examples=200, deadline=None)
@given(node_facts(), st.sampled_from(list(PeerStatus)))
def test_isolated_node_with_witness_lost_never_runs(
    me: dict[str, object], status: PeerStatus
) -> None:
    if status is PeerStatus.ALIVE:
        return
    inp = replace(_view("node1", me, me), peer=PeerView(status), witness_ok=False)
    assert not decide(inp).state.is_primary


def test_generation_compare() -> None:
    assert compare(G1, G1) is Relation.SAME
    assert compare(G1, G2) is Relation.PEER_NEWER
    assert compare(G2, G1) is Relation.LOCAL_NEWER
    assert compare(G2, G3) is Relation.DIVERGED
    assert compare(Generation(), G1) is Relation.PEER_NEWER
    assert compare(G1, Generation()) is Relation.LOCAL_NEWER
    g = G1.advance()
    assert compare(g, G1) is Relation.LOCAL_NEWER and not g.empty
