"""The lab's wiring: bridges in the lab's namespace, veth links, client and witness.

Plain `ip` commands: every step is one line an engineer can replay by hand when a
lab misbehaves, and `down` can find every piece again by its `halab` name.
"""

from __future__ import annotations

from .system import run
from .topology import (
    CLIENT_HOST,
    CLIENT_NS,
    CONTROLLER_HOST,
    HOST_MGMT_LINK,
    LAN,
    MGMT,
    NET_NS,
    NETWORKS,
    PREFIX,
    WITNESS_HOST,
    WITNESS_NS,
    inner_ifname,
    node_host,
    node_index,
    node_mac,
    node_ns,
    port_ifname,
)


def namespaces() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def lab_namespaces() -> list[str]:
    return [ns for ns in namespaces() if ns.startswith(f"{PREFIX}-")]


def link_exists(name: str, netns: str | None = None) -> bool:
    cmd = ["ip", *(["-n", netns] if netns else []), "link", "show", name]
    return run(cmd, check=False).returncode == 0


def _add_ns(name: str) -> None:
    if name not in namespaces():
        run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])
    # IPv6 autoconfiguration only adds noise to captures and timing in an IPv4 lab.
    run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
    run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])


def ensure_fabric() -> None:
    """Bridges, the controller's management link, the client and the witness."""
    _add_ns(NET_NS)
    for net in NETWORKS:
        if not link_exists(net.bridge, NET_NS):
            # A dumb switch: no STP delay, no IGMP snooping (farm VIPs use multicast MACs).
            run(["ip", "-n", NET_NS, "link", "add", net.bridge, "type", "bridge",
                 "stp_state", "0", "mcast_snooping", "0"])  # fmt: skip
        run(["ip", "-n", NET_NS, "link", "set", net.bridge, "up"])
    if not link_exists(HOST_MGMT_LINK):
        run(["ip", "link", "add", HOST_MGMT_LINK, "type", "veth",
             "peer", "name", "mgmt-host", "netns", NET_NS])  # fmt: skip
    run(["ip", "addr", "replace", f"{MGMT.address(CONTROLLER_HOST)}/24", "dev", HOST_MGMT_LINK])
    run(["ip", "link", "set", HOST_MGMT_LINK, "up"])
    run(["ip", "-n", NET_NS, "link", "set", "mgmt-host", "master", MGMT.bridge, "up"])
    _ensure_lan_host(CLIENT_NS, "cl-lan", CLIENT_HOST)
    _ensure_lan_host(WITNESS_NS, "wi-lan", WITNESS_HOST)


def _ensure_lan_host(netns: str, port: str, host: int) -> None:
    _add_ns(netns)
    if not link_exists(port, NET_NS):
        run(["ip", "-n", NET_NS, "link", "add", port, "type", "veth",
             "peer", "name", "lan0", "netns", netns])  # fmt: skip
    run(["ip", "-n", netns, "addr", "replace", f"{LAN.address(host)}/24", "dev", "lan0"])
    run(["ip", "-n", netns, "link", "set", "lan0", "up"])
    run(["ip", "-n", NET_NS, "link", "set", port, "master", LAN.bridge, "up"])


def plug_node(name: str) -> None:
    """Give a node a fresh namespace wired to every bridge, as a powered-on server."""
    index = node_index(name)
    netns = node_ns(name)
    _add_ns(netns)
    for net in NETWORKS:
        port = port_ifname(name, net)
        inner = inner_ifname(net)
        if not link_exists(port, NET_NS):
            run(["ip", "-n", NET_NS, "link", "add", port, "type", "veth",
                 "peer", "name", inner, "netns", netns])  # fmt: skip
            run(["ip", "-n", netns, "link", "set", inner, "address", node_mac(index, net)])
        run(["ip", "-n", netns, "addr", "replace",
             f"{net.address(node_host(index))}/24", "dev", inner])  # fmt: skip
        run(["ip", "-n", netns, "link", "set", inner, "up"])
        run(["ip", "-n", NET_NS, "link", "set", port, "master", net.bridge, "up"])


def unplug_node(name: str) -> None:
    """Delete the node's namespace: its links, addresses, VIPs and nftables rules vanish."""
    netns = node_ns(name)
    if netns in namespaces():
        pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
        if pids:
            run(["kill", "-9", *pids], check=False)
        run(["ip", "netns", "del", netns])
    for net in NETWORKS:
        port = port_ifname(name, net)
        if link_exists(port, NET_NS):
            run(["ip", "-n", NET_NS, "link", "del", port], check=False)


def teardown_all() -> None:
    """Remove every lab namespace and host link, whatever state a killed run left."""
    for netns in lab_namespaces():
        pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
        if pids:
            run(["kill", "-9", *pids], check=False)
        run(["ip", "netns", "del", netns], check=False)
    if link_exists(HOST_MGMT_LINK):
        run(["ip", "link", "del", HOST_MGMT_LINK], check=False)
