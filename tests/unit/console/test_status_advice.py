"""`hactl status` says, for an abnormal state, what it means and what to type next: the
status of two real daemons through the control API, rendered by the CLI's own function."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ha_runtime import api_client
from ha_runtime.advice import module_advice
from ha_runtime.cli import format_status

from .pair import Pair, run_pair


def _status(p: Pair, node: str) -> dict[str, Any]:
    d = p.d1 if node == "node1" else p.d2
    resp = api_client.call(d.cluster.api_socket, {"command": "status"})
    assert resp["ok"], resp
    result: dict[str, Any] = resp["result"]
    return result


def _until(p: Pair, node: str, pred: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        st = _status(p, node)
        if pred(st["modules"][0]) or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def test_status_explains_abnormal_states(tmp_path: Path) -> None:
    out: dict[str, str] = {}

    def scenario(p: Pair) -> None:
        healthy = _until(p, "node1", lambda m: all(c["ok"] for c in m["checkers"]))
        out["healthy"] = format_status(healthy)
        r = api_client.call(p.d2.cluster.api_socket, {"command": "stop", "module": "flightdata"})
        assert r["ok"], r
        out["node1"] = format_status(_until(p, "node1", lambda m: m["state"] == "ALONE"))
        out["node2"] = format_status(_status(p, "node2"))

    run_pair(tmp_path, scenario)
    assert "attention:" not in out["healthy"], out["healthy"]
    assert (
        "  ! flightdata runs on node1 without node2 (STOP): no redundancy\n"
        "    next: bring node2 back (`hactl status` there; `hactl start flightdata` if it was"
        " stopped); a resync follows by itself"
    ) in out["node1"], out["node1"]
    assert (
        "  ! flightdata is stopped on node2 by an operator (it stays stopped across reboots)\n"
        "    next: hactl start flightdata"
    ) in out["node2"], out["node2"]


BASE: dict[str, Any] = {
    "module": "fd", "node": "node1", "peer": "node2", "state": "PRIM", "peer_state": "SECOND",
    "peer_alive": True, "peer_networks": ["hb", "lan"], "networks": ["hb", "lan"],
    "data": "same", "blocked": None, "yielding": None, "witness_ok": None, "checkers": [],
    "replication": None, "reason": "",
}  # fmt: skip


def _said(**changes: Any) -> list[tuple[str, str]]:
    return [(a.what, a.next) for a in module_advice({**BASE, **changes})]


def test_advice_for_each_abnormal_case() -> None:
    assert _said() == []
    split = _said(state="WAIT", data="diverged", peer_state="WAIT")
    assert split[0][0].startswith("SPLIT BRAIN") and "hactl prim fd" in split[0][1]
    newer = _said(state="WAIT", data="peer newer", peer_state="LOST", peer_alive=False)
    assert "node2 has newer data" in newer[0][0] and newer[0][1].endswith("hactl prim fd")
    net = _said(peer_networks=["lan"])
    assert net == [
        (
            "heartbeats from node2 lost on network(s) hb (others still up)",
            "check those links and interfaces on both nodes",
        )
    ]
    failing = _said(checkers=[{"name": "app", "ok": False, "detail": "exit 3"}])
    assert failing[0][0] == "checker app of fd fails: exit 3"
    gave_up = _said(state="SECOND", yielding="checker app: exit 3")
    assert gave_up == [
        ("node1 gave up fd: checker app: exit 3", "fix the cause, then: hactl start fd")
    ]
    rep = {"role": "primary", "in_sync": False, "quarantine": ["/var/lib/hapair/q/1"],
           "resync": {"kind": "incremental", "eta_s": 12.4}, "dirs": []}  # fmt: skip
    resync = _said(replication=rep)
    assert resync[0][0].startswith("split-brain quarantine kept: /var/lib/hapair/q/1")
    assert resync[1][1] == "wait (ETA 12 s); watch: hactl status fd"
    stuck = _said(replication={**rep, "resync": None, "quarantine": [],
                               "dirs": [{"last_error": "TLS handshake refused"}]})  # fmt: skip
    assert stuck == [
        (
            "fd is not replicating to node2 although it is heard (last error: TLS handshake"
            " refused)",
            "hactl resync fd (events: hactl events fd)",
        )
    ]
    assert _said(type="farm", state="UP", drained=True, peer_networks={"node2": ["lan"]}) == [
        ("fd is drained on node1: it takes no new connection", "hactl undrain fd")
    ]
