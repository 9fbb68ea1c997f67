"""playbooks/rotate_secrets.yml replaces the site CA and node certificates with no loss.

On the deployed lab: a rotation runs its three phases (accept both CAs, switch to new
certificates, drop the old CA) with two planned switchovers of flightdata. Afterwards the
nodes hold the new CA only and certificates it signed, the controller's secrets directory
holds them too (deploy.yml then changes nothing on the nodes), the replication link
works under the new CA alone (a further switchover and `hactl verify`), no heartbeat was
rejected, and a second run of the same rotation changes nothing.

With rotate_site_key=true the site key is replaced too (accept, switch, drop, each made
effective by a gated restart of both nodes) while a client asks flightdata every 20 ms and
both daemons are sampled: no heartbeat or frame is refused as forged, no node finds its
peer silent, the application's longest gap stays within the restart gate's bound, and
afterwards the nodes run with the new key only, replication is in sync and equal.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from labcmd import in_node
from siteplay import run_playbook

from ha_lab.lab import Lab
from ha_lab.observe import Probe, longest_outage, wait_for_states

NODES = ("node1", "node2")
SITE_DIR = Path.home() / ".local/share/hapair/sites/lab"
FLIGHTDATA_VIP = "10.77.0.100"
MAX_GAP_S = 2.0  # the restart gate's bound (test_restart_gate.py)


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


class Sampler:
    """`hactl status --json` of both nodes every 0.5 s in a thread, for what happened
    between the playbook's tasks: forged heartbeat drops (a counter that restarts at 0 with
    the daemon: only rises between two samples count) and the site keys each daemon ran."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.forged_rises: list[tuple[str, int, int]] = []
        self.keys_seen: dict[str, list[dict[str, Any]]] = {n: [] for n in NODES}
        self.accepted_key_heartbeats = dict.fromkeys(NODES, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last: dict[str, int] = {}
        while not self._stop.wait(0.5):
            for node in NODES:
                proc = in_node(self.lab, node, "hactl", "status", "--json", timeout=10)
                if proc.returncode != 0:
                    last.pop(node, None)  # restarting: the counters start again at 0
                    continue
                st = json.loads(proc.stdout)
                forged = int(st.get("heartbeat_drops", {}).get("forged", 0))
                if node in last and forged > last[node]:
                    self.forged_rises.append((node, last[node], forged))
                last[node] = forged
                keys = st.get("site_keys")
                if keys and (not self.keys_seen[node] or self.keys_seen[node][-1] != keys):
                    self.keys_seen[node].append(keys)
                self.accepted_key_heartbeats[node] = max(
                    self.accepted_key_heartbeats[node], int(st.get("heartbeat_accepted_key", 0))
                )

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _silent_peer_events(lab: Lab, since: float) -> list[dict[str, Any]]:
    """Decisions taken because the peer was heard on no network (what a key mismatch does)."""
    out = []
    for node in NODES:
        proc = in_node(lab, node, "hactl", "events", "--json", "-n", "500")
        assert proc.returncode == 0, proc.stderr
        events = json.loads(proc.stdout)
        events = events.get("events", events) if isinstance(events, dict) else events
        out += [
            {"node": node, **e}
            for e in events
            if float(e.get("ts", 0)) >= since and "silent" in json.dumps(e)
        ]
    return out


def test_rotation_of_the_site_key_keeps_the_pair_authenticated(mirror_site: Lab) -> None:
    lab = mirror_site
    rotation = time.strftime("lab-key-%Y%m%dT%H%M%S")
    old_key = (SITE_DIR / "site.key").read_bytes()
    old_id = _status(lab, "node1")["site_keys"]["current"]
    assert _status(lab, "node2")["site_keys"] == {"current": old_id, "accepted": []}
    states = wait_for_states("flightdata", {"node1": "PRIM", "node2": "SECOND"}, timeout=60)
    assert states == {"node1": "PRIM", "node2": "SECOND"}, states

    probe = Probe(FLIGHTDATA_VIP, duration=1200).start()
    time.sleep(2)
    since, start = time.time(), time.monotonic()
    try:
        with Sampler(lab) as sampler:
            result = run_playbook(
                "playbooks/rotate_secrets.yml",
                extravars={"rotation": rotation, "rotate_site_key": True},
            )
    finally:
        end = time.monotonic()
        time.sleep(2)
        samples = probe.stop()
    assert result.status == "successful", result.failure_summary()
    gap = longest_outage(samples, start - 2, end + 2)
    print(
        f"rotation {rotation} (CA and site key): {end - start:.0f} s; flightdata's longest"
        f" gap {gap:.2f} s; site keys seen: {sampler.keys_seen}; heartbeats taken with the"
        f" accepted key: {sampler.accepted_key_heartbeats}"
    )

    new_key = (SITE_DIR / "rotations" / rotation / "site.key").read_bytes()
    assert new_key != old_key
    assert (SITE_DIR / "site.key").read_bytes() == new_key, "controller copy not promoted"
    assert (SITE_DIR / "rotations" / rotation / "retired/site.key").read_bytes() == old_key
    new_id = _status(lab, "node1")["site_keys"]["current"]
    assert new_id != old_id
    for node in NODES:
        assert _status(lab, node)["site_keys"] == {"current": new_id, "accepted": []}, node
        held = in_node(lab, node, "cat", "/etc/hapair/site.key").stdout.encode()
        assert held == new_key, f"{node} does not hold the new site key"
        left = in_node(
            lab, node, "ls", "/etc/hapair/site.key.next", "/etc/hapair/site.key.previous"
        )
        assert left.returncode != 0 and left.stdout == "", (
            f"{node} keeps a second key: {left.stdout}"
        )
        # Every phase went through the node's daemon: accept, switch, drop.
        assert {"current": old_id, "accepted": [new_id]} in sampler.keys_seen[node], node
        assert {"current": new_id, "accepted": [old_id]} in sampler.keys_seen[node], node

    assert sampler.forged_rises == [], sampler.forged_rises
    assert _silent_peer_events(lab, since) == []
    assert gap <= MAX_GAP_S, gap
    states = wait_for_states("flightdata", {"node1": "PRIM", "node2": "SECOND"}, timeout=120)
    assert states == {"node1": "PRIM", "node2": "SECOND"}, states
    verdict = _verify(lab)
    assert verdict.get("equal") is True, verdict

    again = run_playbook(
        "playbooks/rotate_secrets.yml", extravars={"rotation": rotation, "rotate_site_key": True}
    )
    assert again.status == "successful", again.failure_summary()
    assert [e.get("task") for e in again.changed] == [], "a finished rotation changed things"
    deploy = run_playbook("playbooks/deploy.yml")
    assert deploy.status == "successful", deploy.failure_summary()
    on_nodes = [e.get("task") for e in deploy.changed if "secret" in str(e.get("task")).lower()]
    assert on_nodes == [], on_nodes
