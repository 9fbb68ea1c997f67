"""playbooks/upgrade.yml: a rolling upgrade from the previous release, the application answering.

The previous release is the runtime of the commit this work started from (PREVIOUS): its
wheelhouse is built from `git archive` of that commit (with this tree's lock: the same
dependencies) and deployed as a prebuilt wheelhouse. Then upgrade.yml installs this tree's
runtime one node at a time while a client asks flightdata through its VIP every 20 ms and
another asks the farm module weather. The longest client-visible gap of each is printed
and must stay within 2 s per node; both nodes then report this tree's version, flightdata
is back PRIM/SECOND in sync with failback, and a second run changes nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

from labcmd import in_node
from siteplay import run_playbook

import ha_lab
from ha_lab.lab import Lab, project_root
from ha_lab.observe import Probe, longest_outage, states_of, wait_for_states

PREVIOUS = "c5b532e"
ROOT = project_root()
BUILDER = ROOT / "collections/ansible_collections/hapair/cluster/roles/runtime/files"
FLIGHTDATA_VIP = "10.77.0.100"
WEATHER_VIP = "10.77.0.200"
MAX_GAP_S = 2.0


def _repository() -> Path:
    """A git checkout holding PREVIOUS: the project's, else the one ha_lab is installed from."""
    for candidate in (ROOT, Path(ha_lab.__file__).resolve().parents[2]):
        probe = ["git", "-C", str(candidate), "cat-file", "-e", f"{PREVIOUS}^{{commit}}"]
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return candidate
    raise AssertionError(f"no git checkout holding {PREVIOUS} (the previous release)")


def _previous_wheelhouse(tmp: Path) -> Path:
    tree = tmp / "previous"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(_repository()), "archive", PREVIOUS], capture_output=True, check=True
    ).stdout
    tar = tmp / "previous.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(tree, filter="data")
    out = subprocess.run(
        [sys.executable, str(BUILDER / "build_wheelhouse.py"), "--project", str(tree),
         "--cache", str(tmp / "cache"), "--lock", str(ROOT / "requirements/node.lock")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return Path(json.loads(out)["path"])


def _versions(lab: Lab) -> dict[str, str | None]:
    found = {}
    for node in ("node1", "node2"):
        status = json.loads(in_node(lab, node, "hactl", "status", "--json").stdout)
        found[node] = status.get("version")
    return found


def _wait_in_sync(lab: Lab, node: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    entry: dict[str, object] = {}
    while time.monotonic() < deadline:
        proc = in_node(lab, node, "hactl", "status", "flightdata", "--json")
        if proc.returncode == 0:
            entry = next(iter(json.loads(proc.stdout)["modules"]), {})
            if entry.get("state") == "SECOND" and str(entry.get("sync", "")).lower() == "in-sync":
                return
        time.sleep(1)
    raise AssertionError(f"flightdata on {node} is not SECOND in sync after {timeout} s: {entry}")


def test_rolling_upgrade_from_the_previous_release(mirror_site: Lab, tmp_path: Path) -> None:
    lab = mirror_site
    previous = _previous_wheelhouse(tmp_path)
    # The previous release has no web console: its configuration must not name one (its
    # validator refuses fields it does not know, as it should).
    old = run_playbook(
        "playbooks/deploy.yml",
        extravars={
            "hapair_runtime_prebuilt_wheelhouse": str(previous),
            "hapair_runtime_console_address": "",
        },
    )
    assert old.status == "successful", old.failure_summary()
    # The restarts of the install may have moved flightdata: either node may be primary.
    deadline = time.monotonic() + 120
    while sorted((states := states_of("flightdata")).values()) != ["PRIM", "SECOND"]:
        assert time.monotonic() < deadline, f"flightdata not PRIM/SECOND: {states}"
        time.sleep(1)
    _wait_in_sync(lab, next(n for n, st in states.items() if st == "SECOND"), timeout=300)
    print(f"previous release deployed: versions {_versions(lab)}")

    probes = {
        "flightdata": Probe(FLIGHTDATA_VIP, duration=900).start(),
        "weather": Probe(WEATHER_VIP, duration=900).start(),
    }
    time.sleep(2)
    start = time.monotonic()
    result = run_playbook("playbooks/upgrade.yml", extravars={"upgrade_failback": True})
    end = time.monotonic()
    time.sleep(2)
    samples = {name: probe.stop() for name, probe in probes.items()}
    assert result.status == "successful", result.failure_summary()
    gaps = {name: longest_outage(s, start - 2, end + 2) for name, s in samples.items()}
    print(f"upgrade.yml took {end - start:.0f} s; longest client-visible gap: {gaps}")
    assert all(gap <= MAX_GAP_S for gap in gaps.values()), gaps

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _versions(lab) == {"node1": version, "node2": version}
    states = wait_for_states("flightdata", {"node1": "PRIM", "node2": "SECOND"}, timeout=60)
    assert states == {"node1": "PRIM", "node2": "SECOND"}, states

    again = run_playbook("playbooks/upgrade.yml", extravars={"upgrade_failback": True})
    assert again.status == "successful", again.failure_summary()
    assert [e.get("task") for e in again.changed] == []
