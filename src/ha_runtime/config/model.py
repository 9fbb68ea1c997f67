"""The typed values of the node file (cluster.yml) and the module files (modules/<name>.yml).

What the parsers (cluster_file.py, module_file.py) build and the runtime reads; the schema is
documented in docs/configuration.md, keep both in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ha_runtime.config.farm import FarmSettings

DEFAULT_CLUSTER_FILE = Path("/etc/hapair/cluster.yml")
DEFAULT_MODULES_DIR = Path("/etc/hapair/modules")
DEFAULT_STATE_DIR = Path("/var/lib/hapair")
DEFAULT_API_SOCKET = Path("/run/hapair/api.sock")
DEFAULT_HEARTBEAT_PORT = 7440
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9440"

ModuleType = Literal["mirror", "farm"]
Failback = Literal["manual", "auto"]
CheckerType = Literal["process", "unit", "tcp", "command", "interface", "witness"]
# The types that probe the application itself: they run where it runs, restart it by
# default, and take a start grace.
APP_CHECKER_TYPES: frozenset[str] = frozenset({"process", "unit", "tcp", "command"})
CheckerAction = Literal["restart", "failover", "wait"]


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
    # App-level checkers: failures do not count until the application has passed once
    # since its start, or this long after it (checkers.StartGrace).
    start_grace_s: float = 10.0

    @property
    def app_level(self) -> bool:
        """App-level checkers only make sense where the application runs (the primary)."""
        return self.type in APP_CHECKER_TYPES


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 3
    window_s: float = 86400.0


@dataclass(frozen=True)
class ReplicationSettings:
    """How a mirror module's `replicated_dirs` travel (docs/replication.md).

    The module file's `replication:` section gives the first five fields; the daemon's child
    for directory n runs with `for_dir(n)`. The last two are not in the file: the in-flight
    limit, and a site key given directly (tests) instead of read from the cluster's file.
    """

    port: int = 7441  # directory n of the module listens on port + n
    ack: Literal["durable", "received"] = "durable"
    timeout_ms: int = 3000
    networks: tuple[str, ...] = ("hb", "lan")
    backing_root: Path | None = None  # default: cluster state_dir / "replica"
    max_inflight_bytes: int = 64 << 20
    # Default: read cluster.site_key. Never in a repr (logs, tracebacks).
    site_key: bytes | None = field(default=None, repr=False)
    # With site_key (tests): the other keys of a site key rotation, accepted too.
    accepted_site_keys: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000

    def backing_base(self, state_dir: Path) -> Path:
        return self.backing_root or state_dir / "replica"

    def for_dir(self, dir_index: int) -> ReplicationSettings:
        """The settings of the module's directory `dir_index` (its own port)."""
        return replace(self, port=self.port + dir_index)


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
    replication: ReplicationSettings = field(default_factory=ReplicationSettings)  # replicated_dirs

    def peer_of(self, node: str) -> str:
        others = [n for n in self.nodes if n != node]
        return others[0]


@dataclass
class SiteConfig:
    cluster: ClusterConfig
    modules: list[ModuleConfig] = field(default_factory=list)
