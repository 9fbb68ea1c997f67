"""`deploy.yml --check --diff` works on a fresh lab and on a deployed one, and touches nothing.

Fresh lab (nodes made again from the image): the dry run succeeds, reports changes on every
node, leaves the nodes without /etc/hapair, /opt/hapair or hapair.service, and builds no
wheelhouse (an empty cache directory stays empty). Then a real deployment, and the dry run
again: it succeeds and reports no change at all, whole (with Mitogen's strategy, the
default, and with ansible-core's linear one) and per phase tag. The deployed
unit's sandbox exposure (systemd-analyze security) is at most 5, its OOM score and nice
value are the role's, and each node reports the project's version.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections import Counter
from pathlib import Path

from labcmd import in_node
from siteplay import PlaybookResult, run_playbook

from ha_lab.lab import Lab
from ha_lab.observe import wait_for_states

NODES = ("node1", "node2")
ROOT = Path(__file__).resolve().parents[2]
CAP_SYS_RESOURCE = 24
CHECK = "--check --diff"


def _changed_by_host(result: PlaybookResult) -> Counter[str]:
    return Counter(str(e.get("host")) for e in result.changed)


def _untouched(lab: Lab, node: str) -> list[str]:
    """What a dry run must not have made on a fresh node."""
    made = []
    for path in ("/etc/hapair", "/opt/hapair", "/etc/systemd/system/hapair.service"):
        if in_node(lab, node, "test", "-e", path).returncode == 0:
            made.append(path)
    return made


def _check_service(lab: Lab, node: str) -> None:
    """The deployed unit's sandbox, priorities and the version the node reports."""
    proc = in_node(lab, node, "systemd-analyze", "security", "--no-pager", "hapair.service")
    match = re.search(r"Overall exposure level for hapair.service: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout[-1500:] + proc.stderr
    exposure = float(match.group(1))
    print(f"{node}: systemd-analyze security hapair: exposure {exposure}")
    assert exposure <= 5.0, proc.stdout
    pid = in_node(lab, node, "systemctl", "show", "-p", "MainPID", "--value", "hapair").stdout
    oom = in_node(lab, node, "cat", f"/proc/{pid.strip()}/oom_score_adj").stdout.strip()
    stat = in_node(lab, node, "cat", f"/proc/{pid.strip()}/stat").stdout
    nice = stat.rsplit(")", 1)[1].split()[16]  # field 19 of proc(5), after "pid (comm)"
    assert nice == "-10", nice
    configured = in_node(
        lab, node, "systemctl", "show", "-p", "OOMScoreAdjust", "--value", "hapair"
    )
    assert configured.stdout.strip() == "-900", configured.stdout
    # Lowering an OOM score needs CAP_SYS_RESOURCE, which the lab's containers lack (systemd
    # then leaves it, as on any container); a real node applies it.
    bounding = in_node(lab, node, "grep", "CapBnd", "/proc/1/status").stdout.split()[1]
    assert oom == ("-900" if int(bounding, 16) >> CAP_SYS_RESOURCE & 1 else "0"), oom
    print(f"{node}: nice {nice}, OOMScoreAdjust configured -900, effective {oom}")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert in_node(lab, node, "hactl", "--version").stdout.strip() == f"hactl {version}"
    status = json.loads(in_node(lab, node, "hactl", "status", "--json").stdout)
    assert status["version"] == version, status


def test_check_mode_on_a_fresh_and_on_a_deployed_lab(lab: Lab, tmp_path: Path) -> None:
    lab.down()
    lab.up(2)
    empty_cache = tmp_path / "wheelhouse"

    fresh = run_playbook(
        "playbooks/deploy.yml",
        extravars={"hapair_runtime_wheelhouse_cache": str(empty_cache)},
        cmdline=CHECK,
    )
    assert fresh.status == "successful", fresh.failure_summary()
    counts = _changed_by_host(fresh)
    print(f"--check on a fresh lab: changed {dict(counts)}")
    assert all(counts[n] > 0 for n in NODES), counts
    for node in NODES:
        assert _untouched(lab, node) == [], f"{node}: the dry run made {_untouched(lab, node)}"
    assert not empty_cache.exists() or not any(empty_cache.iterdir()), "check mode built"

    real = run_playbook("playbooks/deploy.yml")
    assert real.status == "successful", real.failure_summary()
    states = wait_for_states("flightdata", {"node1": "PRIM", "node2": "SECOND"}, timeout=60)
    assert states == {"node1": "PRIM", "node2": "SECOND"}, states

    for node in NODES:
        _check_service(lab, node)

    # ansible.cfg runs Mitogen's strategy (plugins/strategy); the site deployed with it must
    # read as converged to ansible-core's own, the fallback a site can turn to.
    for strategy in ("mitogen_linear", "linear"):
        deployed = run_playbook(
            "playbooks/deploy.yml", cmdline=CHECK, envvars={"ANSIBLE_STRATEGY": strategy}
        )
        assert deployed.status == "successful", f"{strategy}: {deployed.failure_summary()}"
        changed = [f"{e.get('host')}: {e.get('task')}" for e in deployed.changed]
        print(f"--check ({strategy}) on the deployed lab: changed {len(changed)} {changed}")
        assert changed == [], strategy

    for tag in ("install", "configure", "run"):
        phase = run_playbook("playbooks/deploy.yml", cmdline=f"{CHECK} --tags {tag}")
        assert phase.status == "successful", f"--tags {tag}: {phase.failure_summary()}"
        changed = [f"{e.get('host')}: {e.get('task')}" for e in phase.changed]
        print(f"--check --tags {tag} on the deployed lab: changed {len(changed)} {changed}")
        assert changed == [], tag
