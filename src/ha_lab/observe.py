"""Watching hapair from outside the nodes: module states and a client's view of a VIP.

Tests, benchmarks and the demo summary share these, so they all judge "the module is
PRIM on node1" and "the client is served again" the same way.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from .lab import Lab, existing_nodes
from .node import Node
from .stream import ClientStream, optional_str, time_of


def module_states(node: str) -> dict[str, dict[str, Any]]:
    """`hactl status --json` on a node, by module; {} when the node or hactl is down."""
    try:
        argv = Node(node).exec_command(["hactl", "status", "--json"])
    except Exception:
        return {}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    if proc.returncode != 0:
        return {}
    try:
        modules = json.loads(proc.stdout).get("modules", [])
    except json.JSONDecodeError:
        return {}
    return {str(m.get("module")): m for m in modules}


def states_of(module: str) -> dict[str, str]:
    """State of one module on every running node: {"node1": "PRIM", "node2": "SECOND"}."""
    found = {}
    for node in existing_nodes():
        if Node(node).running():
            state = module_states(node).get(module, {}).get("state")
            if state:
                found[node] = str(state)
    return found


def primary_of(module: str) -> str | None:
    prims = [n for n, s in states_of(module).items() if s in ("PRIM", "ALONE")]
    return prims[0] if len(prims) == 1 else None


def wait_for_states(module: str, wanted: dict[str, str], timeout: float) -> dict[str, str]:
    """Poll until every node in wanted has its state; return the last states seen."""
    deadline = time.monotonic() + timeout
    seen = states_of(module)
    while time.monotonic() < deadline:
        if all(seen.get(node) == state for node, state in wanted.items()):
            return seen
        time.sleep(0.25)
        seen = states_of(module)
    return seen


@dataclass
class Sample:
    t: float
    node: str | None


def _sample(data: dict[str, Any]) -> Sample:
    return Sample(time_of(data), optional_str(data["node"]))


@dataclass
class Probe:
    """HTTP requests from the client namespace every `interval` s, recorded as samples."""

    host: str
    port: int = 8080
    path: str = "/health"
    interval: float = 0.02
    timeout: float = 0.25
    duration: float = 120.0

    def __post_init__(self) -> None:
        argv = [
            sys.executable, "-m", "ha_lab.probe", self.host,
            "--port", str(self.port), "--path", self.path, "--interval", str(self.interval),
            "--timeout", str(self.timeout), "--duration", str(self.duration)
        ]  # fmt: skip
        self.stream: ClientStream[Sample] = ClientStream(Lab.client_argv(argv), _sample)

    def start(self) -> Probe:
        self.stream.start()
        return self

    def stop(self) -> list[Sample]:
        self.stream.stop()
        return self.snapshot()

    def snapshot(self) -> list[Sample]:
        return [s for s in self.stream.records() if s is not None]

    def wait_served_by(self, node: str, after: float, timeout: float) -> float | None:
        """Monotonic time of the first success from node after `after`, or None."""

        def first(samples: list[Sample | None]) -> float | None:
            return next((s.t for s in samples if s and s.t >= after and s.node == node), None)

        if not self.stream.wait(lambda samples: first(samples) is not None, timeout, poll=0.02):
            return None
        return first(self.stream.records())


def longest_outage(samples: list[Sample], start: float, end: float) -> float:
    """Longest time without a successful answer between two successes in [start, end]."""
    ok = [s.t for s in samples if s.node is not None and start <= s.t <= end]
    if len(ok) < 2:
        return float("inf")
    return max(b - a for a, b in itertools.pairwise(ok))
