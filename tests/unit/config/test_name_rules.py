"""The name rules have one definition per language, and the two are the same string.

ha_runtime/config/names.py (the runtime's checks on the node) and the collection's
roles/runtime/vars/main.yml (the checks of the inventory before anything is rendered) must
accept the same names: a name Ansible lets through and the runtime refuses fails a deploy
half-way. No other file of the collection may spell the patterns out again.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from ha_runtime.config.names import NAME_RE, NETWORK_RE

ROOT = Path(__file__).resolve().parents[3]
COLLECTION = ROOT / "collections/ansible_collections/hapair/cluster"
RULES = COLLECTION / "roles/runtime/vars/main.yml"


def test_ansible_and_python_rules_are_the_same_strings() -> None:
    rules = yaml.safe_load(RULES.read_text())
    assert rules["hapair_runtime_name_pattern"] == NAME_RE.pattern
    assert rules["hapair_runtime_network_pattern"] == NETWORK_RE.pattern


def test_no_other_copy_of_the_patterns_in_the_collection() -> None:
    copies = [
        str(p.relative_to(ROOT))
        for p in COLLECTION.rglob("*")
        if p.is_file()
        and p != RULES
        and p.suffix in (".yml", ".yaml", ".py", ".j2", ".md")
        and any(pat.pattern in p.read_text(errors="replace") for pat in (NAME_RE, NETWORK_RE))
    ]
    assert copies == []


def test_documented_rules_are_the_runtime_rules() -> None:
    doc = (ROOT / "docs/configuration.md").read_text()
    assert f"`{NAME_RE.pattern}`" in doc and f"`{NETWORK_RE.pattern}`" in doc


PLAYBOOK = """
- name: Validate module descriptions as the module role does
  hosts: localhost
  connection: local
  gather_facts: false
  vars:
    hapair_module_group: site
    hapair_module_modules:
      - name: "{{ module_name }}"
        nodes: [node1, node2]
        default_primary: node1
        vip: {address: 10.77.0.100/24, interface: lan0}
        scripts: {start_prim: /usr/bin/true, stop_prim: /usr/bin/true}
  tasks:
    - name: The module role's checks
      ansible.builtin.include_role:
        name: hapair.cluster.module
        tasks_from: validate
"""


def _validate(tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    (tmp_path / "hosts.yml").write_text(
        "all:\n  children:\n    site:\n      hosts:\n        node1:\n        node2:\n"
    )
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "collections"),
        "ANSIBLE_NOCOLOR": "1",
    }
    return subprocess.run(
        ["ansible-playbook", "-i", "hosts.yml", "play.yml", "-e", f"module_name={name}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )


def test_the_module_role_applies_the_shared_rule(tmp_path: Path) -> None:
    assert NAME_RE.match("flightdata") and not NAME_RE.match("Flight")
    good = _validate(tmp_path, "flightdata")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = _validate(tmp_path, "Flight")
    assert bad.returncode != 0
    # The message still says what was expected, with the pattern spelled out.
    assert f"name matching {NAME_RE.pattern}" in bad.stdout, bad.stdout
