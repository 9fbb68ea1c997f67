"""Lab tests run against real systemd-nspawn nodes; they need root and run in `make test`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from siteplay import run_playbook

from ha_lab.lab import Lab
from ha_lab.observe import wait_for_states


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/lab needs the lab: mark it so `-m lab` selects it.
    here = os.path.dirname(__file__)
    lab_items = [i for i in items if str(i.path).startswith(here + os.sep)]
    for item in lab_items:
        item.add_marker(pytest.mark.lab)
    # test_lab.py takes the lab down at its end, and `mirror_site` deploys once per session:
    # run it before every test that uses the deployed site, whatever their names sort as.
    # test_deploy_check.py next: it needs fresh nodes anyway (test_lab's `down` gives them),
    # and the site it deploys is then the one `mirror_site` finds, not a second fresh deploy.
    leading = ("test_lab.py", "test_deploy_check.py")
    first = sorted(
        (i for i in lab_items if i.path.name in leading), key=lambda i: leading.index(i.path.name)
    )
    if first:
        rest = [i for i in items if i not in first]
        at = next((n for n, i in enumerate(rest) if i in lab_items), len(rest))
        items[:] = rest[:at] + first + rest[at:]


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (they build namespaces and containers); run as root")
    instance = Lab()
    instance.up(2)
    yield instance


@pytest.fixture(scope="session")
def mirror_site(lab: Lab) -> Iterator[Lab]:
    """The lab with the demo site deployed by playbooks/deploy.yml, flightdata PRIM/SECOND.

    Shared by every test that needs hapair running. test_lab.py ends with `down`, so this
    brings the lab up again (idempotent) before deploying (idempotent too).
    """
    lab.up(2)
    result = run_playbook("playbooks/deploy.yml")
    assert result.status == "successful", result.failure_summary()
    states = wait_for_states("flightdata", {"node1": "PRIM", "node2": "SECOND"}, timeout=60)
    if sorted(states.values()) != ["PRIM", "SECOND"]:
        pytest.fail(f"flightdata is not PRIM/SECOND after deploy.yml: {states}")
    if states["node1"] != "PRIM":
        # The tests read node1 as the primary (the site's preferred node); a benchmark or an
        # earlier run may have left node2 primary: back to node1 as a site engineer would.
        back = run_playbook("playbooks/failback.yml", extravars={"module": "flightdata"})
        assert back.status == "successful", back.failure_summary()
        states = wait_for_states("flightdata", {"node1": "PRIM", "node2": "SECOND"}, timeout=120)
        assert states == {"node1": "PRIM", "node2": "SECOND"}, states
    yield lab
