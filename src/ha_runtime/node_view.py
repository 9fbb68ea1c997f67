"""What the metrics exporter and the web console read of the running node.

The daemon builds both and hands itself to them; they see it through these Protocols, so
neither imports the daemon module that imports them (no import cycle, not even one for
type checking). NodeDaemon satisfies both; mypy checks it where the daemon passes itself.
"""

from __future__ import annotations

from typing import Any, Protocol

from ha_runtime.config import ClusterConfig
from ha_runtime.events import EventLog
from ha_runtime.heartbeat.service import HeartbeatService
from ha_runtime.module import ModuleBase


class NodeView(Protocol):
    """The read side: what /metrics exports."""

    @property
    def cluster(self) -> ClusterConfig: ...

    @property
    def modules(self) -> dict[str, ModuleBase]: ...

    @property
    def heartbeat(self) -> HeartbeatService: ...


class OperatedNode(NodeView, Protocol):
    """What the console adds: the events log, and the API's request handler for actions."""

    @property
    def events(self) -> EventLog: ...

    async def handle(self, req: dict[str, Any]) -> Any: ...
