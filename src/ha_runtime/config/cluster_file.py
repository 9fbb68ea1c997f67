"""Parse the node file (/etc/hapair/cluster.yml) into a `ClusterConfig`, every error at once."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from ha_runtime.config.errors import Collector, show
from ha_runtime.config.model import (
    DEFAULT_API_SOCKET,
    DEFAULT_HEARTBEAT_PORT,
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_MODULES_DIR,
    DEFAULT_STATE_DIR,
    ClusterConfig,
    ConsoleSpec,
    ConsoleUserSpec,
    NodeSpec,
    TlsSpec,
)
from ha_runtime.config.names import NAME_RE, NETWORK_RE
from ha_runtime.console.auth import ROLES, BadHash, parse_hash

CLUSTER_FIELDS = frozenset(
    {
        "node",
        "nodes",
        "heartbeat_port",
        "site_key",
        "tls",
        "api_socket",
        "metrics_address",
        "state_dir",
        "modules_dir",
        "console",
    }
)


def parse_cluster(data: Any, path: Path) -> tuple[ClusterConfig | None, list[str]]:
    v = Collector(path)
    d = v.mapping(data, "", CLUSTER_FIELDS)
    if d is None:
        return None, v.errors
    node = v.string(v.required(d, "node", ""), "node", NAME_RE, "a node name like node1")
    nodes = _parse_nodes(v, d.get("nodes"))
    if node is not None and nodes and node not in {n.name for n in nodes}:
        v.err("node", f"{node!r} is not one of nodes[].name ({', '.join(n.name for n in nodes)})")
    port = v.integer(d.get("heartbeat_port", DEFAULT_HEARTBEAT_PORT), "heartbeat_port", 1, 65535)
    site_key = v.abspath(v.required(d, "site_key", ""), "site_key")
    tls = _parse_tls(v, v.required(d, "tls", ""))
    api_socket = v.abspath(d.get("api_socket", str(DEFAULT_API_SOCKET)), "api_socket")
    metrics = _parse_metrics(v, d.get("metrics_address", DEFAULT_METRICS_ADDRESS))
    state_dir = v.abspath(d.get("state_dir", str(DEFAULT_STATE_DIR)), "state_dir")
    modules_dir = v.abspath(d.get("modules_dir", str(DEFAULT_MODULES_DIR)), "modules_dir")
    console = _parse_console(v, d.get("console"), node, nodes)
    if v.errors:
        return None, v.errors
    assert node and port and site_key and tls and api_socket and state_dir and modules_dir
    cfg = ClusterConfig(
        path=path,
        node=node,
        nodes=tuple(nodes),
        heartbeat_port=port,
        site_key=site_key,
        tls=tls,
        api_socket=api_socket,
        metrics_address=metrics,
        state_dir=state_dir,
        modules_dir=modules_dir,
        console=console,
    )
    return cfg, []


def _parse_nodes(v: Collector, value: Any) -> list[NodeSpec]:
    if value is None:
        v.err("nodes", "required field is missing")
        return []
    if not isinstance(value, list) or len(value) < 2:
        v.err("nodes", f"expected a list of at least 2 nodes, got {show(value)}")
        return []
    out: list[NodeSpec] = []
    seen_names: set[str] = set()
    networks: set[str] | None = None
    for i, item in enumerate(value):
        where = f"nodes[{i}]"
        d = v.mapping(item, where, frozenset({"name", "addresses"}))
        if d is None:
            continue
        name = v.string(v.required(d, "name", where), f"{where}.name", NAME_RE, "a node name")
        if name is not None and name in seen_names:
            v.err(f"{where}.name", f"duplicate node name {name!r}")
        addrs_raw = v.required(d, "addresses", where)
        addrs: dict[str, str] = {}
        if addrs_raw is not None:
            if not isinstance(addrs_raw, dict) or not addrs_raw:
                v.err(
                    f"{where}.addresses",
                    f"expected a mapping of network name to IPv4 address, got {show(addrs_raw)}",
                )
            else:
                for net, addr in addrs_raw.items():
                    aw = f"{where}.addresses.{net}"
                    if v.string(net, aw, NETWORK_RE, "a network name like hb or lan") is None:
                        continue
                    ip = v.ipv4(addr, aw)
                    if ip is not None:
                        addrs[str(net)] = ip
                # Heartbeats go node-to-node on each network, so every node needs an
                # address on every network; a typo in one host's vars is caught here.
                if networks is None:
                    networks = set(addrs_raw)
                elif set(addrs_raw) != networks:
                    v.err(
                        f"{where}.addresses",
                        f"expected the same networks as nodes[0] ({', '.join(sorted(networks))}),"
                        f" got {', '.join(sorted(map(str, addrs_raw)))}",
                    )
        if name is not None:
            seen_names.add(name)
            out.append(NodeSpec(name=name, addresses=addrs))
    return out


def _parse_tls(v: Collector, value: Any) -> TlsSpec | None:
    if value is None:
        return None
    d = v.mapping(value, "tls", frozenset({"ca", "cert", "key"}))
    if d is None:
        return None
    ca = v.abspath(v.required(d, "ca", "tls"), "tls.ca")
    cert = v.abspath(v.required(d, "cert", "tls"), "tls.cert")
    key = v.abspath(v.required(d, "key", "tls"), "tls.key")
    if ca is None or cert is None or key is None:
        return None
    return TlsSpec(ca=ca, cert=cert, key=key)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _host_port(v: Collector, value: Any, where: str) -> str | None:
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not (_is_ipv4(host) and port.isdigit() and 1 <= int(port) <= 65535):
        v.err(where, f"expected HOST:PORT like 10.79.0.11:8443, got {show(value)}")
        return None
    return str(value)


def _parse_console(
    v: Collector, value: Any, node: str | None, nodes: list[NodeSpec]
) -> ConsoleSpec | None:
    if value is None:
        return None
    d = v.mapping(value, "console", frozenset({"address", "peers", "users", "session_timeout_s"}))
    if d is None:
        return None
    address = _host_port(v, v.required(d, "address", "console"), "console.address")
    peers: dict[str, str] = {}
    raw_peers = d.get("peers", {})
    if not isinstance(raw_peers, dict):
        v.err(
            "console.peers", f"expected a mapping of node name to HOST:PORT, got {show(raw_peers)}"
        )
    else:
        others = {n.name for n in nodes} - {node}
        for name, addr in raw_peers.items():
            if name not in others:
                v.err(
                    f"console.peers.{name}", f"expected another node ({', '.join(sorted(others))})"
                )
            elif (hp := _host_port(v, addr, f"console.peers.{name}")) is not None:
                peers[str(name)] = hp
    users: list[ConsoleUserSpec] = []
    raw_users = v.required(d, "users", "console")
    if raw_users is not None and (not isinstance(raw_users, list) or not raw_users):
        v.err("console.users", f"expected a non-empty list of users, got {show(raw_users)}")
    for i, item in enumerate(raw_users if isinstance(raw_users, list) else []):
        w = f"console.users[{i}]"
        u = v.mapping(item, w, frozenset({"name", "role", "password_hash", "certificate"}))
        if u is None:
            continue
        name = v.string(v.required(u, "name", w), f"{w}.name", NAME_RE, "a user name like ops")
        role = v.choice(v.required(u, "role", w), f"{w}.role", ROLES)
        pw = u.get("password_hash")
        if pw is not None:
            try:
                parse_hash(str(pw))
            except BadHash as exc:
                v.err(f"{w}.password_hash", str(exc))  # never the hash itself
        cert = u.get("certificate", False)
        if not isinstance(cert, bool):
            v.err(f"{w}.certificate", f"expected true or false, got {show(cert)}")
        elif pw is None and not cert:
            v.err(w, "expected password_hash, certificate: true, or both (no way to log in)")
        if name is not None and name in {x.name for x in users}:
            v.err(f"{w}.name", f"duplicate user {name!r}")
        elif name is not None and role is not None:
            users.append(ConsoleUserSpec(name, role, None if pw is None else str(pw), cert is True))
    timeout = v.number(d.get("session_timeout_s", 3600), "console.session_timeout_s", 60, 86400)
    if address is None or timeout is None:
        return None
    return ConsoleSpec(address, peers, tuple(users), timeout)


def _parse_metrics(v: Collector, value: Any) -> str | None:
    if value is None or value == "":
        return None
    expected = "expected HOST:PORT like 10.79.0.11:9440 (or empty to disable)"
    if not isinstance(value, str) or ":" not in value:
        v.err("metrics_address", f"{expected}, got {show(value)}")
        return None
    host, _, port = value.rpartition(":")
    if not (_is_ipv4(host) and port.isdigit() and 1 <= int(port) <= 65535):
        v.err("metrics_address", f"{expected}, got {value!r}")
        return None
    return value
