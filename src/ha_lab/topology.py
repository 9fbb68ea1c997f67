"""Names and addresses of the lab: one place, so tests, inventory and faults agree.

Node k has `.1k` on every network; bridges live in the lab's own namespace
(`halab-net`) so nothing of the lab touches the host's own network but the one
management link the controller uses, exactly as a real site's jump host would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PREFIX = "halab"
NET_NS = f"{PREFIX}-net"
CLIENT_NS = f"{PREFIX}-client"
WITNESS_NS = f"{PREFIX}-witness"
HOST_MGMT_LINK = f"{PREFIX}-mgmt"
MAX_NODES = 4

STATE_DIR = Path("/var/lib/ha-lab")
CACHE_DIR = Path("/var/cache/ha-lab")
NODES_DIR = STATE_DIR / "nodes"
SSH_DIR = STATE_DIR / "ssh"
SSH_KEY = SSH_DIR / "id_ed25519"
LOCK_FILE = Path("/run/ha-lab.lock")


@dataclass(frozen=True)
class Network:
    name: str
    subnet: str  # first three octets
    index: int  # used in deterministic MAC addresses

    def address(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    @property
    def bridge(self) -> str:
        return f"br-{self.name}"


MGMT = Network("mgmt", "10.79.0", 1)
LAN = Network("lan", "10.77.0", 2)
HB = Network("hb", "10.78.0", 3)
NETWORKS = (MGMT, LAN, HB)
NETWORKS_BY_NAME = {net.name: net for net in NETWORKS}

CONTROLLER_HOST = 1  # 10.79.0.1 on mgmt
CLIENT_HOST = 50  # 10.77.0.50 on lan
WITNESS_HOST = 1  # 10.77.0.1 on lan: the site router


def node_name(index: int) -> str:
    return f"node{index}"


def node_index(name: str) -> int:
    if not name.startswith("node") or not name[4:].isdigit():
        raise ValueError(f"unknown node {name!r}: expected node1..node{MAX_NODES}")
    index = int(name[4:])
    if not 1 <= index <= MAX_NODES:
        raise ValueError(f"unknown node {name!r}: expected node1..node{MAX_NODES}")
    return index


def node_host(index: int) -> int:
    """Last octet of node k on every network: .11, .12, ..."""
    return 10 + index


def node_ns(name: str) -> str:
    return f"{PREFIX}-{name}"


def inner_ifname(net: Network) -> str:
    """Interface name inside a node: mgmt0, lan0, hb0."""
    return f"{net.name}0"


def port_ifname(name: str, net: Network) -> str:
    """The bridge-side end of a node's link: n1-mgmt, n1-lan, ..."""
    return f"n{node_index(name)}-{net.name}"


def node_mac(index: int, net: Network) -> str:
    """Stable MACs: a server keeps its NIC's address across reboots."""
    return f"02:79:00:00:{net.index:02x}:{node_host(index):02x}"


def node_dir(name: str) -> Path:
    return NODES_DIR / name
