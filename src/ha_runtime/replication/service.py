"""``ReplicationService``: one replicated directory, what the process entry (``child``)
and the tests drive (contract: docs/replication.md).

One service replicates one directory of a mirror module (``dir_index`` into
``replicated_dirs``): pyfuse3 serves a single mount per process, so the manager runs one
service per replicated directory, each primary in its own process. The service plays the
role it is started in: ``run_primary`` (``primary.service.Primary``: the file system, the
connect loop, the resync) or ``run_secondary`` (``secondary.server.Secondary``: the
listener, the session, the applier). Both share a ``context.ReplicaContext`` (settings,
``layout`` paths, peer, keys, status).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from ha_runtime.config import ClusterConfig, ModuleConfig, ReplicationSettings
from ha_runtime.replication.context import (
    Event,
    ReplicaContext,
    ReplicationStatus,
    VerifyReport,
)
from ha_runtime.replication.layout import Layout
from ha_runtime.replication.primary.service import Primary
from ha_runtime.replication.secondary.server import Secondary


class ReplicationService:
    def __init__(
        self,
        module: ModuleConfig,
        cluster: ClusterConfig,
        settings: ReplicationSettings | None = None,
        on_event: Callable[[Event], None] | None = None,
        dir_index: int = 0,
        *,
        fence: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.context = ReplicaContext(
            module, cluster, settings or ReplicationSettings(), on_event, dir_index
        )
        self.primary = Primary(self.context, fence)
        self.secondary = Secondary(self.context)

    @property
    def layout(self) -> Layout:
        return self.context.layout

    @property
    def app_dir(self) -> Path:
        return self.context.layout.app_dir

    @property
    def backing(self) -> Path:
        return self.context.layout.backing

    def status(self) -> ReplicationStatus:
        s = self.context.status
        if s.role == "primary":
            self.primary.report(s)
        return s

    async def run_primary(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.primary.run(task_status)

    async def run_secondary(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.secondary.run(task_status)

    # -- the primary's, for the daemon (no effect before run_primary)
    def request_resync(self, full: bool = False, quarantine: bool = False) -> None:
        self.primary.request_resync(full, quarantine)

    async def set_generation(self, gen: str) -> None:
        await self.primary.set_generation(gen)

    def fenced(self, token: str) -> None:
        self.primary.fenced(token)

    async def drain(self, timeout: float) -> bool:
        return await self.primary.drain(timeout)

    async def verify(self) -> VerifyReport:
        return await self.primary.verify()
