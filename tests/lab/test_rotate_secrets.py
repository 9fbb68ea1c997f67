"""playbooks/rotate_secrets.yml replaces the site CA and node certificates with no loss.

On the deployed lab: a rotation runs its three phases (accept both CAs, switch to new
certificates, drop the old CA) with two planned switchovers of flightdata. Afterwards the
nodes hold the new CA only and certificates it signed, the controller's secrets directory
holds them too (deploy.yml then changes nothing on the nodes), the replication link
works under the new CA alone (a further switchover and `hactl verify`), no heartbeat was
rejected, and a second run of the same rotation changes nothing.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from labcmd import in_node
from siteplay import run_playbook

from ha_lab.lab import Lab
from ha_lab.observe import wait_for_states

NODES = ("node1", "node2")
SITE_DIR = Path.home() / ".local/share/hapair/sites/lab"


def _sha256(lab: Lab, node: str, path: str) -> str:
    proc = in_node(lab, node, "sha256sum", path)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[0]


def _status(lab: Lab, node: str) -> dict[str, Any]:
    proc = in_node(lab, node, "hactl", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def _forged(lab: Lab) -> dict[str, int]:
    return {n: int(_status(lab, n)["heartbeat_drops"].get("forged", 0)) for n in NODES}


def _verify(lab: Lab) -> dict[str, Any]:
    primary = next(
        n for n in NODES if any(m["state"] == "PRIM" for m in _status(lab, n)["modules"])
    )
    proc = in_node(lab, primary, "hactl", "verify", "flightdata", "--json", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_rotation_replaces_ca_and_certificates_without_loss(
    mirror_site: Lab, tmp_path: Path
) -> None:
    lab = mirror_site
    rotation = time.strftime("lab-%Y%m%dT%H%M%S")
    old_ca = {n: _sha256(lab, n, "/etc/hapair/tls/ca.crt") for n in NODES}
    old_key = {n: _sha256(lab, n, "/etc/hapair/site.key") for n in NODES}
    forged_before = _forged(lab)

    started = time.monotonic()
    result = run_playbook("playbooks/rotate_secrets.yml", extravars={"rotation": rotation})
    assert result.status == "successful", result.failure_summary()
    print(f"rotation {rotation}: {time.monotonic() - started:.0f} s")
    switchovers = [e for e in result.changed if str(e.get("task")).startswith("Swap")]
    assert len(switchovers) == 2, [e.get("task") for e in switchovers]

    rot = SITE_DIR / "rotations" / rotation
    new_ca = (rot / "ca.crt").read_bytes()
    assert new_ca != (rot / "retired/ca.crt").read_bytes()
    assert (SITE_DIR / "ca.crt").read_bytes() == new_ca, "controller copy not promoted"
    for node in NODES:
        ca = in_node(lab, node, "cat", "/etc/hapair/tls/ca.crt").stdout.encode()
        assert ca == new_ca, f"{node} does not hold the new CA only"
        assert _sha256(lab, node, "/etc/hapair/tls/ca.crt") != old_ca[node]
        assert _sha256(lab, node, "/etc/hapair/site.key") == old_key[node]
        cert = tmp_path / f"{node}.crt"
        cert.write_text(in_node(lab, node, "cat", "/etc/hapair/tls/node.crt").stdout)
        chk = subprocess.run(
            ["openssl", "verify", "-CAfile", str(rot / "ca.crt"), str(cert)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert chk.returncode == 0, f"{node}: {chk.stdout}{chk.stderr}"
        old_ok = subprocess.run(
            ["openssl", "verify", "-CAfile", str(rot / "retired/ca.crt"), str(cert)],
            capture_output=True, check=False,
        )  # fmt: skip
        assert old_ok.returncode != 0, f"{node}'s certificate is still signed by the old CA"
    states = wait_for_states("flightdata", {"node1": "PRIM", "node2": "SECOND"}, timeout=60)
    assert states == {"node1": "PRIM", "node2": "SECOND"}, states

    # The new CA alone carries replication: one more role change, then a full comparison.
    moved = run_playbook("playbooks/switchover.yml", extravars={"module": "flightdata"})
    assert moved.status == "successful", moved.failure_summary()
    verdict = _verify(lab)
    assert verdict.get("equal") is True, verdict
    back = run_playbook("playbooks/failback.yml", extravars={"module": "flightdata"})
    assert back.status == "successful", back.failure_summary()

    again = run_playbook("playbooks/rotate_secrets.yml", extravars={"rotation": rotation})
    assert again.status == "successful", again.failure_summary()
    assert [e.get("task") for e in again.changed] == [], "a finished rotation changed things"

    deploy = run_playbook("playbooks/deploy.yml")
    assert deploy.status == "successful", deploy.failure_summary()
    on_nodes = [e.get("task") for e in deploy.changed if "secret" in str(e.get("task")).lower()]
    assert on_nodes == [], on_nodes

    forged_after = _forged(lab)
    assert forged_after == forged_before, (forged_before, forged_after)
    print(f"forged heartbeats before/after: {forged_before} / {forged_after}")
