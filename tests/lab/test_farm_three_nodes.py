"""A farm of three nodes (`ha-lab up --nodes 3`) works as one of two.

The demo site is deployed on a three-node lab: weather spans every node (flightdata stays
on node1/node2). The molecule `farm` scenario's driver (molecule/farm/farm_scenario.py)
then runs against it: 300 requests shared out (each node 33 % +- 10), node3 crashed (every
request answered again within the detection timeout + 2 s, by the two survivors only),
booted again (no failed request on the connections held on the survivors, its share back).
The lab is rebuilt with two nodes and the site deployed on them again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from farmsite import FARM, VIP, deploy, site_modules
from siteplay import ROOT

from ha_lab.lab import Lab

NODES = ["node1", "node2", "node3"]
REQUESTS = 300


@pytest.fixture
def three_nodes(lab: Lab) -> Iterator[None]:
    lab.up(3)
    try:
        deploy(NODES)
        yield
    finally:
        # Back to the demo's two nodes from scratch: the nodes' files name node3 (cluster.yml,
        # weather.yml), and the runtime play restarts hapair with the new cluster.yml before
        # the module play renders the module files without node3, which it refuses.
        lab.down()
        lab.up(2)
        deploy(["node1", "node2"])


def _share_ok(served: dict[str, int], nodes: list[str], total: int) -> bool:
    ideal = 100 / len(nodes)
    return sorted(served) == nodes and all(
        abs(100 * served[n] / total - ideal) <= 10 for n in nodes
    )


def test_three_node_farm(three_nodes: None) -> None:
    weather = next(m for m in site_modules() if m["name"] == FARM)
    limit = weather["heartbeat"]["timeout_ms"] / 1000 + 2
    proc = subprocess.run(
        [sys.executable, str(ROOT / "molecule" / "farm" / "farm_scenario.py"),
         "--module", FARM, "--vip", VIP, "--requests", str(REQUESTS), "--victim", "node3"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(proc.stdout)
    assert r["spread_before"]["failures"] == 0, r
    assert _share_ok(r["spread_before"]["served"], NODES, REQUESTS), r
    assert r["recovery_s"] is not None and r["recovery_s"] <= limit, r
    assert r["answered_after_recovery_by"] == ["node1", "node2"], r
    assert r["answers_from_victim_after_crash"] == 0, r
    assert r["spread_crashed"]["failures"] == 0, r
    assert _share_ok(r["spread_crashed"]["served"], ["node1", "node2"], REQUESTS), r
    assert set(r["after"].values()) == {"UP"} and sorted(r["after"]) == NODES, r
    assert r["held_requests_during_return"] > 0, r
    assert r["held_failures_total"] == 0, r
    assert r["spread_after"]["failures"] == 0, r
    assert _share_ok(r["spread_after"]["served"], NODES, REQUESTS), r
