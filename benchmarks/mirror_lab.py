"""Shared set-up of the mirror benchmarks: the demo site on the lab, a steady pair."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from ha_lab.observe import states_of


class NotReady(RuntimeError):
    pass


def arguments(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--module", default="flightdata")
    parser.add_argument("--vip", default="10.77.0.100")
    parser.add_argument("--port", type=int, default=8080)
    return parser.parse_args(argv)


def steady_pair(module: str, timeout: float = 180.0) -> tuple[str, str]:
    """Wait for exactly one PRIM and one SECOND (in sync); return (primary, secondary)."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = states_of(module)
        prims = [n for n, s in states.items() if s == "PRIM"]
        seconds = [n for n, s in states.items() if s == "SECOND"]
        if len(prims) == 1 and len(seconds) == 1:
            return prims[0], seconds[0]
        time.sleep(0.5)
    raise NotReady(
        f"module {module} is not PRIM/SECOND after {timeout:.0f} s (states: {states}); "
        "deploy the demo site first: make demo"
    )
