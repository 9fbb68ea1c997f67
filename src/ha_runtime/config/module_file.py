"""Parse a module file (/etc/hapair/modules/<name>.yml) into a `ModuleConfig`, every error at once.

With the node file's `ClusterConfig`, node names and networks are checked against it.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from ha_runtime.config.checker_section import parse_checkers
from ha_runtime.config.errors import Collector, show
from ha_runtime.config.farm import MAX_NODES, FarmSettings, parse_farm_section
from ha_runtime.config.model import (
    ClusterConfig,
    HeartbeatSpec,
    ModuleConfig,
    ReplicationSettings,
    RestartPolicy,
    ScriptsSpec,
    VipSpec,
)
from ha_runtime.config.names import IFNAME_RE, NAME_RE, NETWORK_RE

MODULE_FIELDS = frozenset(
    {
        "name",
        "type",
        "nodes",
        "default_primary",
        "failback",
        "vip",
        "heartbeat",
        "witness",
        "scripts",
        "checkers",
        "restart_policy",
        "replicated_dirs",
        "replication",
        "farm",
    }
)
SCRIPT_FIELDS = frozenset(
    {"start_prim", "stop_prim", "prestart", "poststop", "start_both", "stop_both", "timeout_s"}
)


def parse_module(
    data: Any,
    path: Path,
    cluster: ClusterConfig | None = None,
    check_files: bool = True,
) -> tuple[ModuleConfig | None, list[str]]:
    """Validate one module file; with `cluster`, node names are checked against it.

    `check_files` verifies that scripts exist and are executable; Ansible can turn it off
    when it validates a module file before the scripts are in place.
    """
    v = Collector(path)
    d = v.mapping(data, "", MODULE_FIELDS)
    if d is None:
        return None, v.errors
    name = v.string(v.required(d, "name", ""), "name", NAME_RE, "a module name like flightdata")
    if name is not None and path.suffix in (".yml", ".yaml") and path.stem != name:
        v.err("name", f"expected the file name without .yml ({path.stem!r}), got {name!r}")
    mtype = v.choice(v.required(d, "type", ""), "type", ("mirror", "farm"))
    nodes = _parse_module_nodes(v, d.get("nodes"), mtype, cluster)
    default_primary = None
    if d.get("default_primary") is not None or mtype == "mirror":
        default_primary = v.string(
            v.required(d, "default_primary", ""), "default_primary", NAME_RE, "a node name"
        )
        if default_primary is not None and nodes and default_primary not in nodes:
            v.err(
                "default_primary",
                f"expected one of nodes ({', '.join(nodes)}), got {default_primary!r}",
            )
    failback = v.choice(d.get("failback", "manual"), "failback", ("manual", "auto"))
    vip = _parse_vip(v, v.required(d, "vip", ""))
    heartbeat = _parse_heartbeat(v, d.get("heartbeat", {}))
    witness = v.str_list(d.get("witness", []), "witness", v.ipv4)
    scripts = _parse_scripts(v, d.get("scripts"), mtype, check_files)
    checkers = parse_checkers(v, d.get("checkers", []), tuple(witness), vip)
    restart = _parse_restart(v, d.get("restart_policy", {}))
    dirs = _parse_dirs(v, d.get("replicated_dirs", []))
    replication = _parse_replication(v, d.get("replication", {}), dirs, cluster)
    farm = _parse_farm(v, d, mtype, nodes)
    if v.errors:
        return None, v.errors
    assert name and mtype and failback and heartbeat and scripts and restart and replication
    cfg = ModuleConfig(
        path=path,
        name=name,
        type="mirror" if mtype == "mirror" else "farm",
        nodes=tuple(nodes),
        default_primary=default_primary,
        failback="auto" if failback == "auto" else "manual",
        vip=vip,
        heartbeat=heartbeat,
        witness=tuple(witness),
        scripts=scripts,
        checkers=tuple(checkers),
        restart_policy=restart,
        replicated_dirs=tuple(dirs),
        farm=farm,
        replication=replication,
    )
    return cfg, []


def _parse_farm(
    v: Collector, d: dict[str, Any], mtype: str | None, nodes: list[str]
) -> FarmSettings | None:
    """The `farm:` section: required shape for farm modules, refused on mirror modules."""
    if mtype == "mirror":
        if "farm" in d:
            v.err("farm", "not used by a mirror module (only type farm has a farm section)")
        return None
    if mtype != "farm":
        return None
    if len(nodes) > MAX_NODES:
        v.err("nodes", f"expected at most {MAX_NODES} nodes for a farm module, got {len(nodes)}")
    if "farm" not in d:
        v.err("farm", "required field is missing (a farm module needs farm.rules)")
        return None
    settings, errors = parse_farm_section(d["farm"], v.path, tuple(nodes))
    v.errors.extend(errors)
    return settings


def _parse_module_nodes(
    v: Collector, value: Any, mtype: str | None, cluster: ClusterConfig | None
) -> list[str]:
    if value is None:
        v.err("nodes", "required field is missing")
        return []
    names = v.str_list(value, "nodes", lambda x, w: v.string(x, w, NAME_RE, "a node name"))
    if not isinstance(value, list):
        return []
    if mtype == "mirror" and len(value) != 2:
        v.err("nodes", f"expected exactly 2 nodes for a mirror module, got {len(value)}")
    elif mtype == "farm" and len(value) < 2:
        v.err("nodes", f"expected at least 2 nodes for a farm module, got {len(value)}")
    if len(set(names)) != len(names):
        v.err("nodes", "expected distinct node names")
    if cluster is not None:
        known = {n.name for n in cluster.nodes}
        for i, n in enumerate(names):
            if n not in known:
                v.err(
                    f"nodes[{i}]",
                    f"{n!r} is not a node of {cluster.path} ({', '.join(sorted(known))})",
                )
    return names


def _host_cidr(raw: Any) -> ipaddress.IPv4Interface | None:
    """A usable host address with its prefix (not the network or broadcast address)."""
    if not isinstance(raw, str) or "/" not in raw:
        return None
    try:
        iface = ipaddress.IPv4Interface(raw)
    except ValueError:
        return None
    net = iface.network
    if net.prefixlen >= 31 or iface.ip in (net.network_address, net.broadcast_address):
        return None
    return iface


def _parse_vip(v: Collector, value: Any) -> VipSpec | None:
    if value is None:
        return None
    d = v.mapping(value, "vip", frozenset({"address", "interface"}))
    if d is None:
        return None
    raw = v.required(d, "address", "vip")
    iface = v.string(
        v.required(d, "interface", "vip"), "vip.interface", IFNAME_RE, "an interface name"
    )
    if raw is None:
        return None
    iface_addr = _host_cidr(raw)
    if iface_addr is None:
        v.err(
            "vip.address",
            f"expected an IPv4 address with prefix like 10.77.0.100/24, got {show(raw)}",
        )
        return None
    if iface is None:
        return None
    return VipSpec(str(iface_addr.ip), iface_addr.network.prefixlen, iface)


def _parse_heartbeat(v: Collector, value: Any) -> HeartbeatSpec | None:
    d = v.mapping(
        value if value is not None else {}, "heartbeat", frozenset({"interval_ms", "timeout_ms"})
    )
    if d is None:
        return None
    interval = v.integer(d.get("interval_ms", 300), "heartbeat.interval_ms", 20, 10000)
    timeout = v.integer(d.get("timeout_ms", 3000), "heartbeat.timeout_ms", 100, 120000)
    if interval is None or timeout is None:
        return None
    # Fewer than three chances per timeout turns one lost packet into a failover.
    if timeout < 3 * interval:
        v.err(
            "heartbeat.timeout_ms",
            f"expected at least 3 x interval_ms ({3 * interval}), got {timeout}",
        )
        return None
    return HeartbeatSpec(interval_ms=interval, timeout_ms=timeout)


def _parse_scripts(
    v: Collector, value: Any, mtype: str | None, check_files: bool
) -> ScriptsSpec | None:
    if value is None:
        v.err("scripts", "required field is missing")
        return None
    d = v.mapping(value, "scripts", SCRIPT_FIELDS)
    if d is None:
        return None
    required = ("start_prim", "stop_prim") if mtype == "mirror" else ("start_both", "stop_both")
    wrong = ("start_both", "stop_both") if mtype == "mirror" else ("start_prim", "stop_prim")
    paths: dict[str, Path | None] = {}
    for key in ("start_prim", "stop_prim", "prestart", "poststop", "start_both", "stop_both"):
        where = f"scripts.{key}"
        if key in wrong and key in d and mtype is not None:
            v.err(where, f"not used by a {mtype} module (expected {' and '.join(required)})")
            continue
        raw = d.get(key)
        if raw is None:
            if key in required and mtype is not None:
                v.err(where, "required field is missing")
            paths[key] = None
            continue
        p = v.abspath(raw, where)
        if p is not None and check_files:
            if not p.is_file():
                v.err(where, f"expected an existing executable file, but {p} does not exist")
            elif not os.access(p, os.X_OK):
                v.err(where, f"expected an executable file, but {p} is not executable")
        paths[key] = p
    timeout = v.number(d.get("timeout_s", 60), "scripts.timeout_s", 1, 3600)
    if timeout is None:
        return None
    return ScriptsSpec(timeout_s=timeout, **paths)


def _parse_restart(v: Collector, value: Any) -> RestartPolicy | None:
    d = v.mapping(
        value if value is not None else {},
        "restart_policy",
        frozenset({"max_restarts", "window_s"}),
    )
    if d is None:
        return None
    n = v.integer(d.get("max_restarts", 3), "restart_policy.max_restarts", 0, 1000)
    w = v.number(d.get("window_s", 86400), "restart_policy.window_s", 1, 30 * 86400)
    if n is None or w is None:
        return None
    return RestartPolicy(max_restarts=n, window_s=w)


def _parse_dirs(v: Collector, value: Any) -> list[Path]:
    dirs: list[Path] = v.str_list(value if value is not None else [], "replicated_dirs", v.abspath)
    for i, p in enumerate(dirs):
        if p == Path("/") or any(other in p.parents for other in dirs):
            v.err(
                f"replicated_dirs[{i}]",
                f"expected a directory below / not nested in another, got {p}",
            )
    return dirs


REPLICATION_FIELDS = frozenset({"port", "ack", "timeout_ms", "networks", "backing_root"})


def _parse_replication(
    v: Collector, value: Any, dirs: list[Path], cluster: ClusterConfig | None
) -> ReplicationSettings | None:
    d = v.mapping(value if value is not None else {}, "replication", REPLICATION_FIELDS)
    if d is None:
        return None
    default = ReplicationSettings()
    port = v.integer(d.get("port", default.port), "replication.port", 1, 65535)
    if port is not None and dirs and port + len(dirs) - 1 > 65535:
        v.err(
            "replication.port",
            f"expected a port leaving room for {len(dirs)} directories (port + n), got {port}",
        )
    if (
        port is not None
        and cluster is not None
        and cluster.heartbeat_port in range(port, port + max(1, len(dirs)))
    ):
        v.err(
            "replication.port",
            f"expected a port other than heartbeat_port {cluster.heartbeat_port}, got {port}",
        )
    ack = v.choice(d.get("ack", default.ack), "replication.ack", ("durable", "received"))
    timeout = v.integer(
        d.get("timeout_ms", default.timeout_ms), "replication.timeout_ms", 100, 120000
    )
    networks: list[str] = v.str_list(
        d.get("networks", list(default.networks)),
        "replication.networks",
        lambda x, where: v.string(x, where, NETWORK_RE, "a network name like hb"),
    )
    if "networks" in d and not networks and isinstance(d.get("networks"), list):
        v.err("replication.networks", "expected at least one network name, got an empty list")
    if cluster is not None and "networks" in d:
        known = set(cluster.networks)
        for i, n in enumerate(networks):
            if n not in known:
                v.err(
                    f"replication.networks[{i}]",
                    f"expected one of the node file's networks ({', '.join(sorted(known))}),"
                    f" got {n!r}",
                )
    backing = None
    if d.get("backing_root") is not None:
        backing = v.abspath(d["backing_root"], "replication.backing_root")
        if backing is not None and any(backing == p or p in backing.parents for p in dirs):
            v.err(
                "replication.backing_root",
                f"expected a directory outside every replicated directory, got {backing}",
            )
    if port is None or ack is None or timeout is None:
        return None
    return ReplicationSettings(
        port=port,
        ack="received" if ack == "received" else "durable",
        timeout_ms=timeout,
        networks=tuple(networks),
        backing_root=backing,
    )
