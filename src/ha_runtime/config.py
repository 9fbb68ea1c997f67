"""Load and validate the node file (cluster.yml) and the module files (modules/<name>.yml).

The files are rendered by Ansible from a site's inventory, so a mistake is found on a
running site by a human reading our message: every error names the file, the field path
and what was expected, and we report all errors at once rather than the first one, so a
broken inventory is fixed in one round trip. The schema is documented in
docs/configuration.md; keep both in step.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

if TYPE_CHECKING:
    from ha_runtime.farm.spec import FarmSettings

DEFAULT_CLUSTER_FILE = Path("/etc/hapair/cluster.yml")
DEFAULT_MODULES_DIR = Path("/etc/hapair/modules")
DEFAULT_STATE_DIR = Path("/var/lib/hapair")
DEFAULT_API_SOCKET = Path("/run/hapair/api.sock")
DEFAULT_HEARTBEAT_PORT = 7440
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9440"

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
NETWORK_RE = re.compile(r"^[a-z][a-z0-9_-]{0,14}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")

ModuleType = Literal["mirror", "farm"]
Failback = Literal["manual", "auto"]
CheckerType = Literal["process", "unit", "tcp", "command", "interface", "witness"]
CheckerAction = Literal["restart", "failover", "wait"]

CHECKER_TYPES: tuple[CheckerType, ...] = (
    "process",
    "unit",
    "tcp",
    "command",
    "interface",
    "witness",
)
CHECKER_ACTIONS: tuple[CheckerAction, ...] = ("restart", "failover", "wait")
# Fields each checker type accepts on top of the common ones.
CHECKER_FIELDS: dict[str, frozenset[str]] = {
    "process": frozenset({"process"}),
    "unit": frozenset({"unit"}),
    "tcp": frozenset({"host", "port"}),
    "command": frozenset({"command"}),
    "interface": frozenset({"interface"}),
    "witness": frozenset({"addresses"}),
}
COMMON_CHECKER_FIELDS = frozenset({"name", "type", "interval_s", "timeout_s", "action"})


class ConfigError(Exception):
    """Raised with every problem found in one or more files."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class NodeSpec:
    name: str
    addresses: dict[str, str]  # heartbeat network name -> IPv4 address


@dataclass(frozen=True)
class TlsSpec:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class ConsoleUserSpec:
    name: str
    role: str  # viewer | operator
    password_hash: str | None
    certificate: bool


@dataclass(frozen=True)
class ConsoleSpec:
    """The web console (ha_runtime.console, docs/console.md)."""

    address: str  # "host:port" on the management network
    peers: dict[str, str]  # other node -> its console "host:port"
    users: tuple[ConsoleUserSpec, ...]
    session_timeout_s: float = 3600.0


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    node: str
    nodes: tuple[NodeSpec, ...]
    heartbeat_port: int
    site_key: Path
    tls: TlsSpec
    api_socket: Path
    metrics_address: str | None  # "host:port", None disables the exporter
    state_dir: Path
    modules_dir: Path
    console: ConsoleSpec | None = None  # None: no web console on this node

    @property
    def networks(self) -> tuple[str, ...]:
        return tuple(sorted(self.this_node.addresses))

    @property
    def this_node(self) -> NodeSpec:
        return next(n for n in self.nodes if n.name == self.node)

    def peer(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)

    @property
    def events_log(self) -> Path:
        return self.state_dir / "events.jsonl"


@dataclass(frozen=True)
class VipSpec:
    address: str  # IPv4 address without prefix
    prefixlen: int
    interface: str

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True)
class HeartbeatSpec:
    interval_ms: int = 300
    timeout_ms: int = 3000


@dataclass(frozen=True)
class ScriptsSpec:
    start_prim: Path | None = None
    stop_prim: Path | None = None
    prestart: Path | None = None
    poststop: Path | None = None
    start_both: Path | None = None
    stop_both: Path | None = None
    timeout_s: float = 60.0


@dataclass(frozen=True)
class CheckerSpec:
    name: str
    type: CheckerType
    interval_s: float
    timeout_s: float
    action: CheckerAction
    process: str | None = None
    unit: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    command: tuple[str, ...] = ()
    interface: str | None = None
    addresses: tuple[str, ...] = ()

    @property
    def app_level(self) -> bool:
        """App-level checkers only make sense where the application runs (the primary)."""
        return self.type in ("process", "unit", "tcp", "command")


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 3
    window_s: float = 86400.0


@dataclass(frozen=True)
class ReplicationSpec:
    """How a mirror module's `replicated_dirs` travel (docs/replication.md)."""

    port: int = 7441  # directory n of the module listens on port + n
    ack: Literal["durable", "received"] = "durable"
    timeout_ms: int = 3000
    networks: tuple[str, ...] = ("hb", "lan")
    backing_root: Path | None = None  # default: cluster state_dir / "replica"

    def backing_base(self, state_dir: Path) -> Path:
        return self.backing_root or state_dir / "replica"


@dataclass(frozen=True)
class ModuleConfig:
    path: Path
    name: str
    type: ModuleType
    nodes: tuple[str, ...]
    default_primary: str | None
    failback: Failback
    vip: VipSpec | None
    heartbeat: HeartbeatSpec
    witness: tuple[str, ...]
    scripts: ScriptsSpec
    checkers: tuple[CheckerSpec, ...]
    restart_policy: RestartPolicy
    replicated_dirs: tuple[Path, ...]
    farm: FarmSettings | None = None  # type: farm only (docs/farm.md, the `farm:` section)
    replication: ReplicationSpec = field(default_factory=ReplicationSpec)  # replicated_dirs

    def peer_of(self, node: str) -> str:
        others = [n for n in self.nodes if n != node]
        return others[0]


@dataclass
class SiteConfig:
    cluster: ClusterConfig
    modules: list[ModuleConfig] = field(default_factory=list)


# --------------------------------------------------------------------------- validator


class _V:
    """Collects errors for one file; every accessor records a problem and returns None."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.errors: list[str] = []

    def err(self, where: str, msg: str) -> None:
        self.errors.append(f"{self.path}: {where}: {msg}" if where else f"{self.path}: {msg}")

    def mapping(self, value: Any, where: str, allowed: frozenset[str]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.err(where or "(top level)", f"expected a mapping, got {_show(value)}")
            return None
        for key in value:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.err(_join(where, str(key)), f"unknown field (allowed here: {hint})")
        return value

    def required(self, d: dict[str, Any], key: str, where: str) -> Any:
        if key not in d or d[key] is None:
            self.err(_join(where, key), "required field is missing")
            return None
        return d[key]

    def string(
        self, value: Any, where: str, pattern: re.Pattern[str] | None = None, what: str = ""
    ) -> str | None:
        if not isinstance(value, str) or not value:
            self.err(where, f"expected a non-empty string, got {_show(value)}")
            return None
        if pattern is not None and not pattern.match(value):
            self.err(
                where, f"expected {what or 'a string matching ' + pattern.pattern}, got {value!r}"
            )
            return None
        return value

    def integer(self, value: Any, where: str, lo: int, hi: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(where, f"expected an integer between {lo} and {hi}, got {_show(value)}")
            return None
        if not lo <= value <= hi:
            self.err(where, f"expected an integer between {lo} and {hi}, got {value}")
            return None
        return value

    def number(self, value: Any, where: str, lo: float, hi: float) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.err(where, f"expected a number between {lo:g} and {hi:g}, got {_show(value)}")
            return None
        if not lo <= value <= hi:
            self.err(where, f"expected a number between {lo:g} and {hi:g}, got {value}")
            return None
        return float(value)

    def abspath(self, value: Any, where: str) -> Path | None:
        text = self.string(value, where)
        if text is None:
            return None
        if not text.startswith("/"):
            self.err(where, f"expected an absolute path, got {text!r}")
            return None
        return Path(text)

    def ipv4(self, value: Any, where: str) -> str | None:
        try:
            return str(ipaddress.IPv4Address(value if isinstance(value, str) else ""))
        except ValueError:
            self.err(where, f"expected an IPv4 address like 10.77.0.11, got {_show(value)}")
            return None

    def choice(self, value: Any, where: str, choices: tuple[str, ...]) -> str | None:
        if value not in choices:
            self.err(where, f"expected one of {', '.join(choices)}, got {_show(value)}")
            return None
        return str(value)

    def str_list(self, value: Any, where: str, item: Callable[[Any, str], Any]) -> list[Any]:
        if not isinstance(value, list):
            self.err(where, f"expected a list, got {_show(value)}")
            return []
        out = [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [v for v in out if v is not None]


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _read_yaml(path: Path, v: _V) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        v.err("", f"cannot read file: {exc.strerror}")
        return None
    except UnicodeDecodeError as exc:  # a binary or corrupt file is a config error, not a crash
        v.err("", f"invalid YAML: not UTF-8 (byte {exc.start})")
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        v.err(where, f"invalid YAML: {problem}")
        return None
    except RecursionError:  # PyYAML composes nested nodes recursively: "[[[[..." overflows
        v.err("", "invalid YAML: nested too deeply")
        return None


# --------------------------------------------------------------------------- cluster.yml

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
    v = _V(path)
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


def _parse_nodes(v: _V, value: Any) -> list[NodeSpec]:
    if value is None:
        v.err("nodes", "required field is missing")
        return []
    if not isinstance(value, list) or len(value) < 2:
        v.err("nodes", f"expected a list of at least 2 nodes, got {_show(value)}")
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
                    f"expected a mapping of network name to IPv4 address, got {_show(addrs_raw)}",
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


def _parse_tls(v: _V, value: Any) -> TlsSpec | None:
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


def _host_port(v: _V, value: Any, where: str) -> str | None:
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not (_is_ipv4(host) and port.isdigit() and 1 <= int(port) <= 65535):
        v.err(where, f"expected HOST:PORT like 10.79.0.11:8443, got {_show(value)}")
        return None
    return str(value)


def _parse_console(
    v: _V, value: Any, node: str | None, nodes: list[NodeSpec]
) -> ConsoleSpec | None:
    from ha_runtime.console.auth import ROLES, BadHash, parse_hash  # noqa: PLC0415

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
            "console.peers", f"expected a mapping of node name to HOST:PORT, got {_show(raw_peers)}"
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
        v.err("console.users", f"expected a non-empty list of users, got {_show(raw_users)}")
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
            v.err(f"{w}.certificate", f"expected true or false, got {_show(cert)}")
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


def _parse_metrics(v: _V, value: Any) -> str | None:
    if value is None or value == "":
        return None
    expected = "expected HOST:PORT like 10.79.0.11:9440 (or empty to disable)"
    if not isinstance(value, str) or ":" not in value:
        v.err("metrics_address", f"{expected}, got {_show(value)}")
        return None
    host, _, port = value.rpartition(":")
    if not (_is_ipv4(host) and port.isdigit() and 1 <= int(port) <= 65535):
        v.err("metrics_address", f"{expected}, got {value!r}")
        return None
    return value


# --------------------------------------------------------------------------- modules/<name>.yml

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
    v = _V(path)
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
    checkers = _parse_checkers(v, d.get("checkers", []), tuple(witness), vip)
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
    v: _V, d: dict[str, Any], mtype: str | None, nodes: list[str]
) -> FarmSettings | None:
    """The `farm:` section: required shape for farm modules, refused on mirror modules."""
    if mtype == "mirror":
        if "farm" in d:
            v.err("farm", "not used by a mirror module (only type farm has a farm section)")
        return None
    if mtype != "farm":
        return None
    # Imported here: the farm package imports this module (ModuleConfig) for its own use.
    from ha_runtime.farm.buckets import MAX_NODES  # noqa: PLC0415
    from ha_runtime.farm.spec import parse_farm_section  # noqa: PLC0415

    if len(nodes) > MAX_NODES:
        v.err("nodes", f"expected at most {MAX_NODES} nodes for a farm module, got {len(nodes)}")
    if "farm" not in d:
        v.err("farm", "required field is missing (a farm module needs farm.rules)")
        return None
    settings, errors = parse_farm_section(d["farm"], v.path, tuple(nodes))
    v.errors.extend(errors)
    return settings


def _parse_module_nodes(
    v: _V, value: Any, mtype: str | None, cluster: ClusterConfig | None
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


def _parse_vip(v: _V, value: Any) -> VipSpec | None:
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
            f"expected an IPv4 address with prefix like 10.77.0.100/24, got {_show(raw)}",
        )
        return None
    if iface is None:
        return None
    return VipSpec(str(iface_addr.ip), iface_addr.network.prefixlen, iface)


def _parse_heartbeat(v: _V, value: Any) -> HeartbeatSpec | None:
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


def _parse_scripts(v: _V, value: Any, mtype: str | None, check_files: bool) -> ScriptsSpec | None:
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


def _parse_checkers(
    v: _V, value: Any, witness: tuple[str, ...], vip: VipSpec | None
) -> list[CheckerSpec]:
    if not isinstance(value, list):
        v.err("checkers", f"expected a list, got {_show(value)}")
        return []
    out: list[CheckerSpec] = []
    names: set[str] = set()
    for i, item in enumerate(value):
        where = f"checkers[{i}]"
        ctype = item.get("type") if isinstance(item, dict) else None
        allowed = COMMON_CHECKER_FIELDS | CHECKER_FIELDS.get(str(ctype), frozenset())
        d = v.mapping(item, where, allowed)
        if d is None:
            continue
        name = v.string(v.required(d, "name", where), f"{where}.name", NAME_RE, "a checker name")
        if name is not None:
            if name in names:
                v.err(f"{where}.name", f"duplicate checker name {name!r}")
            names.add(name)
        t = v.choice(v.required(d, "type", where), f"{where}.type", CHECKER_TYPES)
        interval = v.number(d.get("interval_s", 5), f"{where}.interval_s", 0.1, 3600)
        timeout = v.number(d.get("timeout_s", 3), f"{where}.timeout_s", 0.1, 3600)
        default_action = "restart" if t in ("process", "unit", "tcp", "command") else "wait"
        action = v.choice(d.get("action", default_action), f"{where}.action", CHECKER_ACTIONS)
        spec = _checker_details(v, d, where, t, witness=witness, vip=vip)
        if None in (name, t, interval, timeout, action) or spec is None:
            continue
        assert name and t and interval and timeout and action
        out.append(
            CheckerSpec(
                name=name,
                type=t,  # type: ignore[arg-type]
                interval_s=interval,
                timeout_s=timeout,
                action=action,  # type: ignore[arg-type]
                **spec,
            )
        )
    return out


def _checker_details(
    v: _V,
    d: dict[str, Any],
    where: str,
    t: str | None,
    *,
    witness: tuple[str, ...],
    vip: VipSpec | None,
) -> dict[str, Any] | None:
    if t == "process":
        p = v.string(v.required(d, "process", where), f"{where}.process")
        return None if p is None else {"process": p}
    if t == "unit":
        u = v.string(v.required(d, "unit", where), f"{where}.unit")
        return None if u is None else {"unit": u}
    if t == "tcp":
        host = v.ipv4(d.get("host", "127.0.0.1"), f"{where}.host")
        port = v.integer(v.required(d, "port", where), f"{where}.port", 1, 65535)
        return None if host is None or port is None else {"host": host, "port": port}
    if t == "command":
        raw = v.required(d, "command", where)
        argv: list[str] = []
        if isinstance(raw, str):
            try:
                argv = shlex.split(raw)
            except ValueError:
                argv = []
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            argv = list(raw)
        if raw is not None and (not argv or not argv[0].startswith("/")):
            v.err(
                f"{where}.command",
                f"expected a command line starting with an absolute path, got {_show(raw)}",
            )
            return None
        return None if not argv else {"command": tuple(argv)}
    if t == "interface":
        default = vip.interface if vip is not None else None
        iface = v.string(
            d.get("interface", default), f"{where}.interface", IFNAME_RE, "an interface name"
        )
        return None if iface is None else {"interface": iface}
    if t == "witness":
        addrs = v.str_list(d.get("addresses", list(witness)), f"{where}.addresses", v.ipv4)
        if not addrs:
            v.err(f"{where}.addresses", "expected at least one address (or a module witness list)")
            return None
        return {"addresses": tuple(addrs)}
    return None


def _parse_restart(v: _V, value: Any) -> RestartPolicy | None:
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


def _parse_dirs(v: _V, value: Any) -> list[Path]:
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
    v: _V, value: Any, dirs: list[Path], cluster: ClusterConfig | None
) -> ReplicationSpec | None:
    d = v.mapping(value if value is not None else {}, "replication", REPLICATION_FIELDS)
    if d is None:
        return None
    default = ReplicationSpec()
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
    return ReplicationSpec(
        port=port,
        ack="received" if ack == "received" else "durable",
        timeout_ms=timeout,
        networks=tuple(networks),
        backing_root=backing,
    )


# --------------------------------------------------------------------------- loading


def load_cluster(path: Path = DEFAULT_CLUSTER_FILE) -> ClusterConfig:
    v = _V(path)
    data = _read_yaml(path, v)
    if v.errors:
        raise ConfigError(v.errors)
    cfg, errors = parse_cluster(data, path)
    if errors or cfg is None:
        raise ConfigError(errors)
    return cfg


def load_module(
    path: Path, cluster: ClusterConfig | None = None, check_files: bool = True
) -> ModuleConfig:
    v = _V(path)
    data = _read_yaml(path, v)
    if v.errors:
        raise ConfigError(v.errors)
    cfg, errors = parse_module(data, path, cluster, check_files)
    if errors or cfg is None:
        raise ConfigError(errors)
    return cfg


def module_files(modules_dir: Path) -> Iterator[Path]:
    if modules_dir.is_dir():
        yield from sorted(p for p in modules_dir.iterdir() if p.suffix in (".yml", ".yaml"))


def load_site(cluster_path: Path = DEFAULT_CLUSTER_FILE) -> SiteConfig:
    """Load the node file and every module file; all errors of all files are raised together."""
    cluster = load_cluster(cluster_path)
    errors: list[str] = []
    modules: list[ModuleConfig] = []
    vips: dict[str, Path] = {}
    for path in module_files(cluster.modules_dir):
        try:
            m = load_module(path, cluster)
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        if m.vip is not None:  # mirror and farm: one module per virtual IP
            if m.vip.address in vips:
                errors.append(
                    f"{path}: vip.address: {m.vip.address} is already used by {vips[m.vip.address]}"
                )
            vips[m.vip.address] = path
        modules.append(m)
    if errors:
        raise ConfigError(errors)
    return SiteConfig(cluster=cluster, modules=modules)


def check_file(path: Path, cluster_path: Path | None = None, check_files: bool = True) -> list[str]:
    """What `hactl config check FILE` prints: every error, or an empty list.

    The kind of file is told by its content: a node file has a top-level `node` field.
    """
    v = _V(path)
    data = _read_yaml(path, v)
    if v.errors:
        return v.errors
    if isinstance(data, dict) and "node" in data:
        return parse_cluster(data, path)[1]
    cluster = None
    if cluster_path is not None and cluster_path.exists():
        try:
            cluster = load_cluster(cluster_path)
        except ConfigError as exc:
            return exc.errors
    return parse_module(data, path, cluster, check_files)[1]
