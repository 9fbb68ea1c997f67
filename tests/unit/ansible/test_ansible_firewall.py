"""hapair.cluster.runtime's nftables template, rendered by ansible itself for a sample site
and checked by the real `nft -c -f` (root: nft checks against the kernel)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
ROLE = ROOT / "collections/ansible_collections/hapair/cluster/roles/runtime"

SITE: dict[str, object] = {
    "hapair_runtime_group": "hapair_nodes",
    "hapair_runtime_heartbeat_port": 7440,
    "hapair_runtime_metrics_address": "127.0.0.1:9440",
    "hapair_runtime_console_address": "10.1.0.11:9443",
    "hapair_modules": [
        {"name": "flightdata", "replicated_dirs": ["/srv/a", "/srv/b"]},
        {"name": "radar", "replication": {"port": 7450}, "replicated_dirs": ["/srv/r"]},
        {"name": "noreplica"},
        {"name": "elsewhere", "nodes": ["node2", "node3"], "replicated_dirs": ["/srv/x"]},
        {"name": "web", "type": "farm", "replicated_dirs": []},
    ],
}
ADDRESSES = {
    "node1": {"hb": "192.168.77.1", "lan": "10.1.0.11", "v6": "fd00::1"},
    "node2": {"hb": "192.168.77.2", "lan": "10.1.0.12"},
}


def render(tmp: Path) -> str:
    inventory = {
        "hapair_nodes": {
            "hosts": {
                name: {"ansible_connection": "local", "__hapair_runtime_node_addresses": addrs}
                for name, addrs in ADDRESSES.items()
            },
            "vars": {**SITE, "ansible_python_interpreter": sys.executable},
        }
    }
    (tmp / "inventory.json").write_text(json.dumps(inventory))
    out = tmp / "hapair.nft"
    nft = shutil.which("nft") or "/usr/sbin/nft"
    task = {
        "ansible.builtin.template": {
            "src": str(ROLE / "templates/hapair.nft.j2"),
            "dest": str(out),
            "mode": "0644",
            "validate": f"{nft} -c -f %s",
        }
    }
    play = [{"hosts": "node1", "gather_facts": False, "tasks": [task]}]
    (tmp / "play.json").write_text(json.dumps(play))
    playbook = Path(sys.executable).parent / "ansible-playbook"
    proc = subprocess.run(
        [str(playbook), "-i", str(tmp / "inventory.json"), str(tmp / "play.json")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out.read_text()


def test_rendered_ruleset_is_valid_and_exact(tmp_path: Path) -> None:
    text = render(tmp_path)
    rules = [line.strip() for line in text.splitlines()]
    assert "udp dport 7440 ip daddr { 10.1.0.11, 192.168.77.1 } accept" in rules
    assert "udp dport 7440 ip6 daddr { fd00::1 } accept" in rules
    assert "udp dport 7440 drop" in rules
    # Replication: this node's mirror modules only (flightdata 7441+7442, radar 7450).
    assert "tcp dport { 7441, 7442, 7450 } ip saddr { 10.1.0.12, 192.168.77.2 } accept" in rules
    assert "tcp dport { 7441, 7442, 7450 } drop" in rules
    assert "tcp dport 9440 ip daddr 127.0.0.1 accept" in rules
    assert "tcp dport 9443 ip daddr 10.1.0.11 accept" in rules
    assert "tcp dport 9443 drop" in rules
    # The file loads on its own again and again: it replaces the table, never appends.
    assert rules.index("delete table inet hapair") < rules.index("table inet hapair {")
    nft = shutil.which("nft") or "/usr/sbin/nft"
    path = str(tmp_path / "hapair.nft")
    check = subprocess.run([nft, "-c", "-f", path], capture_output=True, check=False)
    assert check.returncode == 0, check.stderr
