"""What the replication lab tests share: the demo module's replicated state, seen from outside."""

from __future__ import annotations

import json
import time
from typing import Any

from labcmd import in_node

from ha_lab.lab import Lab
from ha_lab.observe import module_states, states_of

MODULE = "flightdata"
VIP = "10.77.0.100"
PORT = 8080
APP_DIR = "/var/lib/flightdata"
# state_dir/replica/<module>/<n>: the real files on each node (docs/replication.md)
BACKING = "/var/lib/hapair/replica/flightdata/0"
REPL_PORT = 7441  # replication.port of directory 0


def entry(node: str) -> dict[str, Any]:
    """The module's `hactl status --json` entry on a node ({} when down)."""
    return module_states(node).get(MODULE, {})


def other(node: str) -> str:
    return "node2" if node == "node1" else "node1"


def in_sync_pair(timeout: float = 180.0) -> tuple[str, str]:
    """Wait for PRIM + SECOND in sync (the primary's replication too); (primary, secondary)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = {n: entry(n) for n in ("node1", "node2")}
        prims = [n for n, e in seen.items() if e.get("state") == "PRIM"]
        if len(prims) == 1:
            prim, second = prims[0], other(prims[0])
            rep = seen[prim].get("replication") or {}
            if (
                seen[second].get("state") == "SECOND"
                and seen[second].get("sync") == "in-sync"
                and rep.get("in_sync")
            ):
                return prim, second
        time.sleep(0.5)
    keys = ("state", "sync", "reason", "replication")
    brief = {n: {k: e.get(k) for k in keys} for n, e in seen.items()}
    raise AssertionError(f"{MODULE} not PRIM/SECOND in sync after {timeout:.0f} s: {brief}")


def wait_state(node: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    e = entry(node)
    while time.monotonic() < deadline and e.get("state") not in states:
        time.sleep(0.25)
        e = entry(node)
    return e


def verify(lab: Lab, primary: str) -> dict[str, Any]:
    """`hactl verify` on the primary: per-file digests of both copies."""
    proc = in_node(lab, primary, "hactl", "verify", MODULE, "--json", timeout=600)
    assert proc.stdout.strip().startswith("{"), f"hactl verify refused: {proc.stderr}"
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def events(lab: Lab, node: str) -> list[dict[str, Any]]:
    proc = in_node(lab, node, "tail", "-n", "400", "/var/lib/hapair/events.jsonl")
    out = []
    for line in proc.stdout.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def states() -> dict[str, str]:
    return states_of(MODULE)


def sh(lab: Lab, node: str, script: str, timeout: float = 300) -> str:
    proc = in_node(lab, node, "sh", "-c", script, timeout=timeout)
    assert proc.returncode == 0, f"{node}: {script!r} failed: {proc.stderr[-2000:]}"
    return proc.stdout
