"""Decisions of a module with replicated directories: adoption only once in sync, PRIM only
while replicating, split brain yields to SECOND (quarantine) instead of WAIT."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ha_runtime.generation import Generation, GenRecord
from ha_runtime.heartbeat.peers import PeerStatus, PeerView
from ha_runtime.mirror.decision import Inputs, decide
from ha_runtime.states import Flag, State

G1 = Generation(0x11, ())
G2 = Generation(0x22, (0x11,))
G3 = Generation(0x33, (0x11,))
E = Flag.ELIGIBLE


def inputs(
    node: str = "node1",
    state: State = State.WAIT,
    gen: Generation = G1,
    peer: PeerView | None = None,
    **kw: object,
) -> Inputs:
    base = Inputs(
        node=node,
        peer_name="node2" if node == "node1" else "node1",
        default_primary="node1",
        state=state,
        record=GenRecord(gen),
        peer=peer or PeerView(PeerStatus.ALIVE, State.SECOND, E, gen),
        quarantine_on_split=True,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def alive(state: State, gen: Generation = G1, flags: Flag = E) -> PeerView:
    return PeerView(PeerStatus.ALIVE, state, flags, gen)


def test_secondary_resyncing_does_not_adopt_the_primary_generation() -> None:
    d = decide(inputs("node2", State.SECOND, G1, alive(State.ALONE, G2), replica_sync=False))
    assert d.state is State.SECOND
    assert not d.adopt_peer_generation


def test_secondary_in_sync_adopts() -> None:
    d = decide(inputs("node2", State.SECOND, G1, alive(State.ALONE, G2), replica_sync=True))
    assert d.state is State.SECOND
    assert d.adopt_peer_generation


def test_without_replication_adoption_is_immediate() -> None:
    d = decide(inputs("node2", State.SECOND, G1, alive(State.ALONE, G2), quarantine_on_split=False))
    assert d.adopt_peer_generation


def test_primary_stays_alone_until_replication_in_sync() -> None:
    i = inputs("node1", State.ALONE, G2, alive(State.SECOND, G2), replica_sync=False)
    assert decide(i).state is State.ALONE
    assert decide(replace(i, replica_sync=True)).state is State.PRIM


def test_prim_losing_replication_goes_alone_with_a_new_generation() -> None:
    d = decide(inputs("node1", State.PRIM, G2, alive(State.SECOND, G2), replica_sync=False))
    assert d.state is State.ALONE
    assert d.new_generation
    assert d.peer_outdated is True


def test_takeover_after_swap_is_alone_until_replicating() -> None:
    # The old primary handed over (SECOND, HANDOVER); we win, but nothing replicates yet.
    peer = alive(State.SECOND, G2, E | Flag.HANDOVER)
    d = decide(inputs("node2", State.SECOND, G2, peer, replica_sync=False))
    assert d.state is State.ALONE
    assert d.new_generation


def test_stale_secondary_never_primary_when_the_primary_dies() -> None:
    lost = PeerView(PeerStatus.LOST, State.ALONE, E, G2)
    d = decide(inputs("node2", State.SECOND, G1, lost, replica_sync=False))
    assert d.state is State.WAIT


@pytest.mark.parametrize("state", [State.ALONE, State.PRIM])
def test_split_brain_yielding_primary_becomes_second_for_quarantine(state: State) -> None:
    # node2 does not outrank node1 (default primary) on diverged data.
    d = decide(inputs("node2", state, G3, alive(State.ALONE, G2), replica_sync=False))
    assert d.state is State.SECOND
    assert "SPLIT BRAIN" in d.reason
    assert not d.adopt_peer_generation


def test_split_brain_winner_keeps_the_role() -> None:
    d = decide(inputs("node1", State.ALONE, G2, alive(State.ALONE, G3), replica_sync=False))
    assert d.state is State.ALONE


def test_split_brain_waiting_node_follows_with_quarantine() -> None:
    d = decide(inputs("node2", State.WAIT, G3, alive(State.ALONE, G2), replica_sync=None))
    assert d.state is State.SECOND


def test_split_brain_without_replication_still_waits() -> None:
    d = decide(inputs("node2", State.WAIT, G3, alive(State.ALONE, G2), quarantine_on_split=False))
    assert d.state is State.WAIT


GENS = st.sampled_from([Generation(), G1, G2, G3])
STATES = st.sampled_from(list(State))


@given(
    node=st.sampled_from(["node1", "node2"]),
    state=STATES,
    gen=GENS,
    peer_state=STATES,
    peer_gen=GENS,
    status=st.sampled_from(list(PeerStatus)),
    sync=st.sampled_from([None, False, True]),
)
def test_never_adopt_while_replication_is_not_in_sync(  # noqa: PLR0917
    node: str,
    state: State,
    gen: Generation,
    peer_state: State,
    peer_gen: Generation,
    status: PeerStatus,
    sync: bool | None,
) -> None:
    i = inputs(node, state, gen, PeerView(status, peer_state, E, peer_gen), replica_sync=sync)
    d = decide(i)
    if sync is False:
        assert not d.adopt_peer_generation
        # and a primary that does not replicate is never PRIM
        assert d.state is not State.PRIM
