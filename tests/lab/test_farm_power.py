"""A farm's `power` decides its share: 3:1 gives 3:1 (within 10 points) over 400 connections.

The demo site is deployed with the weather module's power set to node1: 3, node2: 1;
400 requests through the VIP from the client namespace, each on a new connection (a new
source port, so each is hashed on its own), must be answered, 75 % +- 10 by node1. The
lab is left with power 3:1; later tests deploy what they need.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from farmsite import VIP, deploy, with_farm

from ha_lab.farm_client import spread
from ha_lab.lab import Lab

REQUESTS = 400


@pytest.fixture
def power_3_1(lab: Lab) -> Iterator[None]:
    lab.up(2)
    deploy(["node1", "node2"], with_farm(power={"node1": 3, "node2": 1}))
    # No re-deploy of the committed site afterwards: every later test deploys the site it
    # needs (three nodes, the mirror site), and a re-deploy here once failed in CI's run
    # for a reason not yet diagnosed (tracked in the issue-5 note), hiding this result.
    yield


def test_power_3_to_1(power_3_1: None) -> None:
    result = spread(VIP, count=REQUESTS)
    served = result["served"]
    assert result["failures"] == 0, result
    assert sum(served.values()) == REQUESTS, result
    share1 = 100 * served.get("node1", 0) / REQUESTS
    assert 65 <= share1 <= 85, (
        f"node1 served {share1:.1f} % with power 3:1, expected 75 +- 10: {result}"
    )
