"""hapair.cluster.runtime's nftables template, rendered by ansible itself for a sample site
and checked by the real `nft -c -f` (root: nft checks against the kernel). The lab test
tests/lab/test_firewall.py loads it on the nodes."""

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
    "hapair_runtime_firewall_ssh_port": 2222,
    "hapair_runtime_firewall_allow": [
        {"ports": [9100], "saddr": ["10.9.0.0/24", "fd00:9::/64"]},
        {"protocol": "udp", "ports": ["5000-5010", 6000]},
    ],
    "hapair_modules": [
        {
            "name": "flightdata",
            "vip": {"address": "10.1.0.100/24"},
            "check_url": "http://10.1.0.100:8080/health",
            "replicated_dirs": ["/srv/a", "/srv/b"],
        },
        {"name": "radar", "replication": {"port": 7450}, "replicated_dirs": ["/srv/r"]},
        {
            "name": "noreplica",
            "vip": {"address": "fd00::100/64"},
            "checkers": [{"name": "db", "type": "tcp", "port": 5432}],
        },
        {"name": "portal", "vip": {"address": "10.1.0.101/24"}, "check_url": "https://portal/"},
        {
            "name": "elsewhere",
            "nodes": ["node2", "node3"],
            "vip": {"address": "10.1.0.102/24"},
            "check_url": "tcp://10.1.0.102:7000",
            "replicated_dirs": ["/srv/x"],
        },
        {
            "name": "web",
            "type": "farm",
            "vip": {"address": "10.1.0.200/24"},
            "farm": {"rules": [{"ports": [80, "9000-9010"]}, {"protocol": "udp", "ports": [53]}]},
        },
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
    start = text.index("chain input {")
    rules = [line.strip() for line in text[start:].splitlines()]
    accepted = [r for r in rules if r.endswith("accept")]
    assert accepted == [
        'iif "lo" accept',
        "ct state established,related accept",
        "meta l4proto { icmp, icmpv6, igmp } accept",
        "tcp dport 2222 accept",
        "udp dport 7440 ip daddr { 10.1.0.11, 192.168.77.1 } accept",
        "udp dport 7440 ip6 daddr fd00::1 accept",
        # Replication: this node's mirror modules only (flightdata 7441+7442, radar 7450).
        "tcp dport { 7441, 7442, 7450 } ip saddr { 10.1.0.12, 192.168.77.2 } accept",
        "tcp dport 9440 ip daddr 127.0.0.1 accept",
        "tcp dport 9443 ip daddr 10.1.0.11 accept",
        # Services on the VIPs: check_url's port, https's default, a tcp checker's, the
        # farm's rules; not `elsewhere` (not on this node).
        "tcp dport 8080 ip daddr 10.1.0.100 accept",
        "tcp dport 5432 ip6 daddr fd00::100 accept",
        "tcp dport 443 ip daddr 10.1.0.101 accept",
        "tcp dport { 80, 9000-9010 } ip daddr 10.1.0.200 accept",
        "udp dport 53 ip daddr 10.1.0.200 accept",
        "tcp dport 9100 ip saddr 10.9.0.0/24 accept",
        "tcp dport 9100 ip6 saddr fd00:9::/64 accept",
        "udp dport { 5000-5010, 6000 } accept",
    ]
    # Everything else to the node is dropped.
    assert "type filter hook input priority -10; policy drop;" in rules
    # The file loads on its own again and again: it replaces the table, never appends.
    lines = [line.strip() for line in text.splitlines()]
    assert lines.index("delete table inet hapair") < lines.index("table inet hapair {")
    nft = shutil.which("nft") or "/usr/sbin/nft"
    path = str(tmp_path / "hapair.nft")
    check = subprocess.run([nft, "-c", "-f", path], capture_output=True, check=False)
    assert check.returncode == 0, check.stderr
