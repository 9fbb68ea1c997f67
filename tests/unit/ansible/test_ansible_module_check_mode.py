"""hapair.cluster.ha_command in check mode on a node where hapair is not there yet.

A dry run of a first deployment (deploy.yml --check) reaches the module role's start task
with no hactl and no daemon: the module must report what a real run would do, not fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MODULE = ROOT / "collections/ansible_collections/hapair/cluster/plugins/modules/ha_command.py"


def run_module(args: dict[str, object], check_mode: bool) -> dict[str, object]:
    payload = {"ANSIBLE_MODULE_ARGS": {**args, "_ansible_check_mode": check_mode}}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "collections")}
    proc = subprocess.run(
        [sys.executable, str(MODULE)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_check_mode_without_hapair_reports_the_action() -> None:
    args = {"module": "flightdata", "action": "start", "hactl": "/nonexistent/hactl"}
    result = run_module(args, check_mode=True)
    assert not result.get("failed"), result
    assert result["changed"] is True
    assert "would start flightdata" in str(result["msg"])


def test_a_real_run_without_hapair_still_fails() -> None:
    args = {"module": "flightdata", "action": "start", "hactl": "/nonexistent/hactl"}
    result = run_module(args, check_mode=False)
    assert result.get("failed") is True, result


def test_ha_status_allow_down_without_hapair_reports_down() -> None:
    status = MODULE.with_name("ha_status.py")
    payload = {"ANSIBLE_MODULE_ARGS": {"hactl": "/nonexistent/hactl", "allow_down": True}}
    proc = subprocess.run(
        [sys.executable, str(status)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "collections")},
        check=False,
    )
    result = json.loads(proc.stdout)
    assert not result.get("failed"), result
    assert result["running"] is False and "not installed" in result["msg"]
