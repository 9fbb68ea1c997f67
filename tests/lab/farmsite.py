"""Deploying the demo site with a variant of its farm module, for the farm lab tests.

The site's modules are the inventory's `hapair_modules` (inventories/lab/group_vars);
a test passes a modified copy as extra vars to playbooks/deploy.yml, and deploys the
committed one again when it is done, so the lab is left as the demo describes it.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from siteplay import ROOT, run_playbook

from ha_lab.observe import wait_for_states

MODULES_FILE = ROOT / "inventories" / "lab" / "group_vars" / "all" / "modules.yml"
FARM = "weather"
VIP = "10.77.0.200"


def site_modules() -> list[dict[str, Any]]:
    modules: list[dict[str, Any]] = yaml.safe_load(MODULES_FILE.read_text())["hapair_modules"]
    return modules


def with_farm(**farm: Any) -> list[dict[str, Any]]:
    """The site's modules with the weather module's `farm:` section updated."""
    modules = copy.deepcopy(site_modules())
    weather = next(m for m in modules if m["name"] == FARM)
    weather["farm"].update(farm)
    return modules


def deploy(nodes: list[str], modules: list[dict[str, Any]] | None = None) -> None:
    """deploy.yml (with these modules, else the committed ones); weather UP on every node."""
    extravars = {"hapair_modules": modules} if modules is not None else None
    result = run_playbook("playbooks/deploy.yml", extravars=extravars)
    assert result.status == "successful", result.failure_summary()
    states = wait_for_states(FARM, dict.fromkeys(nodes, "UP"), timeout=60)
    assert states == dict.fromkeys(nodes, "UP"), f"{FARM} is not UP everywhere: {states}"
