"""What both roles of one replicated directory share on this node: the settings, the
paths (``layout``), the peer, the keys, the status the daemon reads and the events it gets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ha_runtime.config import ClusterConfig, ModuleConfig, ReplicationSettings
from ha_runtime.generation import GenerationStore, atomic_write
from ha_runtime.replication.journal import derive_key
from ha_runtime.replication.layout import Layout
from ha_runtime.replication.link.framing import AcceptedKeys
from ha_runtime.replication.link.tls import TlsFiles
from ha_runtime.security import read_accepted_keys

log = logging.getLogger("hapair.replication")


@dataclass(frozen=True)
class Event:
    kind: str
    module: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReplicationStatus:
    role: str = "idle"
    state: str = "idle"  # sync | alone | resyncing | idle
    link: str = "down"
    address: str | None = None
    last_seq: int = 0
    acked_seq: int = 0
    inflight_bytes: int = 0
    dirty_bytes: int = 0
    dirty_paths: int = 0
    resync: dict[str, Any] | None = None
    # The generation the primary declared this copy in sync at (secondary: the manager adopts
    # the primary's generation only while this equals it).
    synced_generation: str | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    # Frames whose tag the other key of a site key rotation made (the peer switched at
    # another moment): expected during a rotation only.
    accepted_key_frames: int = 0
    last_error: str | None = None
    # Sessions ended by an unexpected error (each a link failure, reconnected with backoff).
    session_errors: int = 0
    ack_latency: dict[str, Any] | None = None  # primary: barrier ack times (metrics)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    equal: bool
    files: int
    differences: list[str]


class ReplicaContext:
    """One replicated directory (``dir_index`` into the module's ``replicated_dirs``) on this
    node, whichever role it plays."""

    def __init__(
        self,
        module: ModuleConfig,
        cluster: ClusterConfig,
        settings: ReplicationSettings,
        on_event: Callable[[Event], None] | None,
        dir_index: int,
    ) -> None:
        self.module = module
        self.cluster = cluster
        self.settings = settings
        self.on_event = on_event
        self.layout = Layout.of(module, dir_index, cluster.state_dir, settings)
        self.generations = GenerationStore(cluster.state_dir, module.name)
        self.peer = module.peer_of(cluster.node)
        key, accepted = settings.site_key, settings.accepted_site_keys
        if key is None:
            key = cluster.site_key.read_bytes().rstrip(b"\n")
            # Read at each start of the child, so a role change picks up a rotation's files.
            accepted = read_accepted_keys(cluster.site_key, key)
        self.key = derive_key(key)
        # The frames the peer tags with the other key of a site key rotation are taken too.
        self.accepted = AcceptedKeys(
            tuple(derive_key(k) for k in accepted), self.count_accepted_key_frame
        )
        self.tls = TlsFiles(cluster.tls.ca, cluster.tls.cert, cluster.tls.key)
        self.status = ReplicationStatus()

    def count_accepted_key_frame(self) -> None:
        self.status.accepted_key_frames += 1

    def emit(self, kind: str, /, **detail: Any) -> None:
        log.info("replication %s: %s %s", self.module.name, kind, detail)
        if self.on_event:
            self.on_event(Event(kind, self.module.name, detail))

    def rejected(self, reason: str) -> None:
        """A frame or connection refused (counted by reason, as an event too)."""
        self.status.rejected[reason] = self.status.rejected.get(reason, 0) + 1
        self.emit("link_refused", reason=reason)

    # Generation at which both copies were last identical (``layout.synced``: written on
    # both sides at the end of a resync, and by a primary that drained cleanly on stop).
    def read_synced(self) -> str | None:
        try:
            return self.layout.synced.read_text().strip() or None
        except FileNotFoundError:
            return None

    def write_synced(self, gen: str) -> None:
        atomic_write(self.layout.synced, (gen + "\n").encode())
