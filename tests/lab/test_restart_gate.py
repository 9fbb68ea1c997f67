"""A re-deploy that restarts hapair goes through the gate: the application never notices.

Changing the unit (here the scheduling priority) notifies the runtime role's restart
handler. Before the gate, each node was restarted in place, and a restart of the primary
was a failover (a stopping daemon demotes its node). Now each module is handed to the
peer first and the next node waits until this one is SECOND in sync again. A client asks
flightdata through its VIP every 20 ms and the farm module weather likewise: the longest
gap of each must stay within 2 s, both nodes must have restarted, and flightdata ends
PRIM/SECOND in sync.
"""

from __future__ import annotations

import json
import time

from labcmd import in_node
from siteplay import run_playbook

from ha_lab.lab import Lab
from ha_lab.observe import Probe, longest_outage, states_of

FLIGHTDATA_VIP = "10.77.0.100"
WEATHER_VIP = "10.77.0.200"
MAX_GAP_S = 2.0


def _started_at(lab: Lab, node: str) -> str:
    proc = in_node(lab, node, "systemctl", "show", "-p", "ActiveEnterTimestampMonotonic", "hapair")
    return proc.stdout.strip()


def _in_sync(lab: Lab) -> bool:
    states = states_of("flightdata")
    if sorted(states.values()) != ["PRIM", "SECOND"]:
        return False
    second = next(n for n, s in states.items() if s == "SECOND")
    proc = in_node(lab, second, "hactl", "status", "flightdata", "--json")
    entry = next(iter(json.loads(proc.stdout)["modules"]), {}) if proc.returncode == 0 else {}
    return str(entry.get("sync", "")).lower() == "in-sync"


def test_a_redeploy_that_restarts_hapair_is_not_a_failover(mirror_site: Lab) -> None:
    lab = mirror_site
    deadline = time.monotonic() + 300
    while not _in_sync(lab):
        assert time.monotonic() < deadline, (
            f"flightdata not PRIM/SECOND in sync: {states_of('flightdata')}"
        )
        time.sleep(1)
    before = {n: _started_at(lab, n) for n in ("node1", "node2")}
    probes = {
        "flightdata": Probe(FLIGHTDATA_VIP, duration=600).start(),
        "weather": Probe(WEATHER_VIP, duration=600).start(),
    }
    time.sleep(2)
    start = time.monotonic()
    try:
        changed = run_playbook("playbooks/deploy.yml", extravars={"hapair_runtime_nice": -9})
        assert changed.status == "successful", changed.failure_summary()
        restored = run_playbook("playbooks/deploy.yml")
        assert restored.status == "successful", restored.failure_summary()
    finally:
        end = time.monotonic()
        time.sleep(2)
        samples = {name: probe.stop() for name, probe in probes.items()}
    after = {n: _started_at(lab, n) for n in ("node1", "node2")}
    assert all(after[n] != before[n] for n in after), f"hapair not restarted: {before} {after}"
    gaps = {name: longest_outage(s, start - 2, end + 2) for name, s in samples.items()}
    print(f"two re-deploys with restarts took {end - start:.0f} s; longest gap: {gaps}")
    assert all(gap <= MAX_GAP_S for gap in gaps.values()), gaps
    assert _in_sync(lab), states_of("flightdata")
