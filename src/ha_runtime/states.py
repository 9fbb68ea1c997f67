"""Module states shared by the heartbeat codec, the manager, the API and the metrics."""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    # Values travel in heartbeats: never renumber, only append.
    STOP = 0
    WAIT = 1
    ALONE = 2
    PRIM = 3
    SECOND = 4
    UP = 5

    @property
    def is_primary(self) -> bool:
        return self in (State.ALONE, State.PRIM)


class Flag(enum.IntFlag):
    """Bits a node announces in its heartbeats, beside its state."""

    NONE = 0
    # The sender could run the application now (started, no failing checker, not yielding).
    ELIGIBLE = 1
    # The sender is handing the primary role over (planned switchover): it must lose any tie.
    HANDOVER = 2
    # The sender (a secondary) asks the primary to hand the role over to it.
    SWAP_REQUEST = 4
