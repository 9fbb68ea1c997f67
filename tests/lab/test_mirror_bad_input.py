"""Bad input is refused with a message naming the field: on a node and in the inventory.

On a node, `hactl config check` runs the daemon's own validation on a module file. On
the controller, deploy.yml validates every role's inputs (argument_specs) in its first
plays, so a broken inventory fails there, before any host is changed.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from labcmd import in_node
from siteplay import ROOT, failure_message, run_playbook

from ha_lab.lab import Lab

MODULE_FILE = "/etc/hapair/modules/flightdata.yml"
BAD_DIR = "/root/bad-input"
VALIDATION_PLAYS = {
    "Check the site inventory",
    "Validate the inputs and the nodes before any change",
}


def _deployed_module(lab: Lab) -> dict[str, Any]:
    proc = in_node(lab, "node1", "cat", MODULE_FILE)
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert isinstance(data, dict)
    return data


def _unknown_field(m: dict[str, Any]) -> str:
    m["heartbaet"] = m.pop("heartbeat")
    return yaml.safe_dump(m)


def _bad_vip(m: dict[str, Any]) -> str:
    m["vip"]["address"] = "10.77.0.300/24"
    return yaml.safe_dump(m)


def _missing_script(m: dict[str, Any]) -> str:
    m["scripts"]["start_prim"] = "/usr/local/libexec/flightdata/no_such_script"
    return yaml.safe_dump(m)


def _malformed(m: dict[str, Any]) -> str:
    return yaml.safe_dump(m) + "vip: [10.77.0.100/24\n"


NODE_CASES: dict[str, tuple[Callable[[dict[str, Any]], str], list[str]]] = {
    "malformed": (_malformed, ["invalid YAML", "line "]),
    "unknown-field": (_unknown_field, ["heartbaet: unknown field"]),
    "bad-vip": (_bad_vip, ["vip.address:", "'10.77.0.300/24'"]),
    "missing-script": (_missing_script, ["scripts.start_prim:", "no_such_script does not exist"]),
}


@pytest.mark.parametrize("case", sorted(NODE_CASES))
def test_hactl_config_check_names_the_field(mirror_site: Lab, case: str) -> None:
    breaker, expected = NODE_CASES[case]
    text = breaker(_deployed_module(mirror_site))
    path = f"{BAD_DIR}/{case}/flightdata.yml"  # the file name must be <name>.yml
    write = subprocess.run(
        mirror_site.exec_argv(
            "node1", ["sh", "-c", f"mkdir -p {BAD_DIR}/{case} && cat > {path}"]
        ),
        input=text, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert write.returncode == 0, write.stderr
    check = in_node(mirror_site, "node1", "hactl", "config", "check", path)
    assert check.returncode == 1, (check.stdout, check.stderr)
    for needle in [path, *expected]:
        assert needle in check.stderr, check.stderr
    # The deployed file itself still passes, and the daemon did not notice the drafts.
    good = in_node(mirror_site, "node1", "hactl", "config", "check", MODULE_FILE)
    assert good.returncode == 0, good.stderr
    in_node(mirror_site, "node1", "rm", "-rf", f"{BAD_DIR}/{case}")


def _break_unknown_field(m: dict[str, Any]) -> None:
    m["heartbeat"]["timeout"] = 1000


def _break_bad_vip(m: dict[str, Any]) -> None:
    m["vip"]["address"] = "10.77.0.300/24"


def _break_missing_script(m: dict[str, Any]) -> None:
    del m["scripts"]["start_prim"]


def _break_malformed(m: dict[str, Any]) -> None:
    m["heartbeat"]["interval_ms"] = "fast"


INVENTORY_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], list[str]]] = {
    "unknown-field": (_break_unknown_field, ["timeout"]),
    "bad-vip": (_break_bad_vip, ["10.77.0.300/24", "vip.address"]),
    "missing-script": (_break_missing_script, ["start_prim"]),
    "malformed": (_break_malformed, ["interval_ms"]),
}


def _broken_inventory(tmp_path: Path, breaker: Callable[[dict[str, Any]], None]) -> Path:
    inventory = tmp_path / "lab"
    shutil.copytree(ROOT / "inventories" / "lab", inventory)
    modules_file = inventory / "group_vars" / "all" / "modules.yml"
    data = yaml.safe_load(modules_file.read_text())
    breaker(next(m for m in data["hapair_modules"] if m["name"] == "flightdata"))
    modules_file.write_text(yaml.safe_dump(data))
    return inventory


@pytest.mark.parametrize("case", sorted(INVENTORY_CASES))
def test_deploy_refuses_a_broken_inventory_before_any_change(
    mirror_site: Lab, tmp_path: Path, case: str
) -> None:
    breaker, expected = INVENTORY_CASES[case]
    result = run_playbook("playbooks/deploy.yml", inventory=_broken_inventory(tmp_path, breaker))
    assert result.status == "failed", result.failure_summary()
    assert result.failures, result.failure_summary()
    # It failed in the validation plays, and no later play (the ones that change hosts) ran.
    assert {f.get("play") for f in result.failures} <= VALIDATION_PLAYS, result.failure_summary()
    assert set(result.plays) <= VALIDATION_PLAYS, result.plays
    assert result.changed == [], result.changed
    messages = " ".join(failure_message(f) for f in result.failures)
    for needle in expected:
        assert needle in messages, result.failure_summary()
