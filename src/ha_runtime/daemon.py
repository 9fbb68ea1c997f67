"""The node daemon: heartbeats, one manager per module, API, metrics, systemd notify."""

from __future__ import annotations

import logging
import signal
from typing import Any

import trio

from ha_runtime import api, sdnotify
from ha_runtime.config import ModuleConfig, SiteConfig
from ha_runtime.console.server import ConsoleServer
from ha_runtime.events import EventLog, RefusalLog
from ha_runtime.farm.module import FarmModule
from ha_runtime.heartbeat.packet import Drop
from ha_runtime.heartbeat.peers import LocalAnnounce, ModuleStream
from ha_runtime.heartbeat.service import HeartbeatService
from ha_runtime.metrics import Metrics
from ha_runtime.mirror.module import CommandRefused, MirrorModule, VipOps
from ha_runtime.states import State
from ha_runtime.version import runtime_version

log = logging.getLogger(__name__)

# READY=1 waits for every module's first decision, at most this long: a module stuck in a
# slow prestart must not keep the unit "activating" until systemd's start timeout kills it.
SETTLE_TIMEOUT_S = 60.0

COMMANDS = ("start", "stop", "restart", "prim", "second", "swap")
FARM_COMMANDS = ("drain", "undrain")
REPLICATION_COMMANDS = ("verify", "resync")


class NodeDaemon:
    def __init__(
        self,
        site: SiteConfig,
        key: bytes,
        *,
        vip_ops: VipOps | None = None,
        metrics: bool = True,
        pair_keys: dict[str, bytes] | None = None,  # heartbeat key per peer (heartbeat.keys)
    ) -> None:
        c = site.cluster
        self.cluster = c
        # Only modules this node is part of: mirror modules here, farm modules in self.farms.
        self.modules: list[ModuleConfig] = [
            m for m in site.modules if c.node in m.nodes and m.type == "mirror"
        ]
        farm_modules = [m for m in site.modules if c.node in m.nodes and m.type == "farm"]
        for m in site.modules:
            if m not in self.modules and m not in farm_modules:
                log.info("module %s: not managed here (type %s, nodes %s)", m.name, m.type, m.nodes)
        self.events = EventLog(c.events_log)
        self._refusals = RefusalLog(self.events, "heartbeat_refused")
        self.metrics = Metrics()
        self._serve_metrics = metrics and c.metrics_address is not None
        streams = {
            m.name: ModuleStream(
                m.name,
                tuple(n for n in m.nodes if n != c.node),
                m.heartbeat.interval_ms / 1000,
                m.heartbeat.timeout_ms / 1000,
            )
            for m in [*self.modules, *farm_modules]
        }
        self.heartbeat = HeartbeatService(
            node=c.node,
            key=key,
            port=c.heartbeat_port,
            bind=dict(c.this_node.addresses),
            peers={n.name: dict(n.addresses) for n in c.nodes if n.name != c.node},
            streams=streams,
            announce=self._announce,
            on_drop=self._on_heartbeat_drop,
            state_dir=c.state_dir,
            pair_keys=pair_keys,
        )
        self.managers: dict[str, MirrorModule] = {
            m.name: MirrorModule(
                cluster=c,
                module=m,
                peers=self.heartbeat.table,
                events=self.events,
                send_now=self.heartbeat.send_now,
                vip_ops=vip_ops,
                on_transition=self.metrics.on_transition,
            )
            for m in self.modules
        }
        self.farms: dict[str, FarmModule] = {
            m.name: FarmModule(
                cluster=c,
                module=m,
                peers=self.heartbeat.table,
                events=self.events,
                send_now=self.heartbeat.send_now,
                on_transition=self.metrics.on_transition,
            )
            for m in farm_modules
        }
        self.ready = trio.Event()  # API and heartbeats up
        self.settle_timeout_s = SETTLE_TIMEOUT_S
        self.console: ConsoleServer | None = None  # when cluster.yml configures one

    def _on_heartbeat_drop(self, reason: Drop) -> None:
        self.metrics.on_drop(reason)
        self._refusals(reason.value)

    def _announce(self, module: str) -> LocalAnnounce:
        if module in self.farms:
            return self.farms[module].announce()
        return self.managers[module].announce()

    async def run(self) -> None:
        self.metrics.set_build(self.cluster.node)
        if self._serve_metrics and self.cluster.metrics_address:
            self.metrics.serve(self.cluster.metrics_address)
        for name, mgr in self.managers.items():
            self.metrics.set_state(name, mgr.state)
            self.events.append(name, "daemon_start", node=self.cluster.node, state=mgr.state.name)
        for name, farm in self.farms.items():
            self.metrics.set_state(name, farm.state)
            self.events.append(name, "daemon_start", node=self.cluster.node, state=farm.state.name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.heartbeat.run)
            await self.heartbeat.ready.wait()
            await nursery.start(api.serve, self.cluster.api_socket, self.handle)
            if self.cluster.console is not None:
                self.console = ConsoleServer(self, self.cluster.console)
                await nursery.start(self.console.serve)
            async with trio.open_nursery() as modules:
                for mgr in self.managers.values():
                    modules.start_soon(mgr.run)
                for farm in self.farms.values():
                    modules.start_soon(farm.run)
                nursery.start_soon(self._watch_signals, modules.cancel_scope, nursery.cancel_scope)
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._peer_gauges)
                self.ready.set()
                nursery.start_soon(self._notify_ready)
            # Modules cancelled by a signal: hand every role over cleanly, tell the peer.
            sdnotify.notify("STOPPING=1")
            with trio.CancelScope(shield=True):
                for mgr in self.managers.values():
                    await mgr.shutdown()
                for farm in self.farms.values():
                    await farm.shutdown()
            nursery.cancel_scope.cancel()

    def _unsettled(self) -> list[str]:
        modules = [*self.managers.items(), *self.farms.items()]
        return [f"{name} ({m.state.name})" for name, m in modules if not m.settled]

    async def _notify_ready(self) -> None:
        """READY=1 once every module made its first decision or the settle timeout passed."""
        deadline = trio.current_time() + self.settle_timeout_s
        said = ""
        while (waiting := self._unsettled()) and trio.current_time() < deadline:
            status = "STATUS=waiting for the first decision of " + ", ".join(waiting)
            if status != said:  # systemctl status shows why the unit is still activating
                sdnotify.notify(status)
                said = status
            await trio.sleep(0.05)
        states = ", ".join(
            f"{name} {m.state.name}" for name, m in [*self.managers.items(), *self.farms.items()]
        )
        if waiting:
            status = f"modules not settled after {self.settle_timeout_s:g}s: " + ", ".join(waiting)
            log.warning("hapair daemon ready on %s, %s", self.cluster.node, status)
        else:
            status = f"modules settled: {states or 'none'}"
            log.info("hapair daemon ready on %s, %s", self.cluster.node, status)
        sdnotify.notify(f"READY=1\nSTATUS={status}")

    async def _watch_signals(self, modules: trio.CancelScope, _all: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                log.info("received %s: stopping", signal.Signals(sig).name)
                modules.cancel()
                return

    async def _peer_gauges(self) -> None:
        while True:
            for name, mgr in self.managers.items():
                self.metrics.peer_alive.labels(name).set(1 if mgr.peer_view().alive else 0)
            for name, farm in self.farms.items():
                alive = any(p.alive for p in farm.peer_views())
                self.metrics.peer_alive.labels(name).set(1 if alive else 0)
            try:
                self.metrics.observe(self)
            except Exception:  # metrics must never take the daemon down
                log.exception("metrics: snapshot failed")
            await trio.sleep(1)

    async def _watchdog(self) -> None:
        period = sdnotify.watchdog_period()
        if period is None:
            return
        while True:
            # The watchdog is fed from the same trio loop as the managers: a wedged loop
            # stops the pings and systemd restarts us.
            sdnotify.notify("WATCHDOG=1")
            await trio.sleep(period)

    # ----------------------------------------------------------------- API

    def status(self, module: str | None = None) -> dict[str, Any]:
        if module is not None and module in self.farms:
            entries = [self.farms[module].status()]
        elif module:
            entries = [self._manager(module).status()]
        else:
            entries = [m.status() for m in self.managers.values()]
            entries += [f.status() for f in self.farms.values()]
        return {
            "node": self.cluster.node,
            "version": runtime_version(),
            "networks": list(self.cluster.networks),  # heartbeat networks (advice: which down)
            "modules": entries,
            "heartbeat_drops": dict(self.heartbeat.drops),
        }

    def _manager(self, name: Any) -> MirrorModule:
        if not isinstance(name, str) or name not in self.managers:
            known = ", ".join(sorted([*self.managers, *self.farms])) or "none"
            raise api.ApiError(f"unknown module {name!r} on {self.cluster.node} (known: {known})")
        return self.managers[name]

    async def _replication_command(self, cmd: str, module: Any, req: dict[str, Any]) -> Any:
        if module in self.farms:
            raise api.ApiError(f"{cmd} {module} refused: farm modules replicate nothing")
        mgr = self._manager(module)
        try:
            if cmd == "verify":
                result: dict[str, Any] = await mgr.cmd_verify()
                return result
            message = await mgr.cmd_resync(full=bool(req.get("full")))
        except CommandRefused as exc:
            raise api.ApiError(str(exc)) from exc
        return {"message": message, "status": mgr.status()}

    async def handle(self, req: dict[str, Any]) -> Any:
        cmd = req["command"]
        module = req.get("module")
        if cmd == "status":
            for farm in self.farms.values() if module is None else []:
                await farm.refresh()
            if module in self.farms:
                await self.farms[module].refresh()
            return self.status(module)
        if module in self.farms and cmd in COMMANDS + FARM_COMMANDS:
            farm = self.farms[module]
            try:
                farm_message: str = await getattr(farm, f"cmd_{cmd}")()
            except CommandRefused as exc:
                raise api.ApiError(str(exc)) from exc
            return {"message": farm_message, "status": farm.status()}
        if cmd in FARM_COMMANDS:
            self._manager(module)
            raise api.ApiError(
                f"{cmd} {module} refused: {module} is a mirror module; drain and undrain are "
                f"for farm modules (use `hactl swap {module}` to move a mirror module)"
            )
        if cmd == "events":
            if module is not None and module not in self.farms:
                self._manager(module)
            limit = req.get("limit")
            return self.events.read(module, limit if isinstance(limit, int) else None)
        if cmd in REPLICATION_COMMANDS:
            return await self._replication_command(cmd, module, req)
        if cmd in COMMANDS:
            mgr = self._manager(module)
            try:
                message: str = await getattr(mgr, f"cmd_{cmd}")()
            except CommandRefused as exc:
                raise api.ApiError(str(exc)) from exc
            return {"message": message, "status": mgr.status()}
        raise api.ApiError(f"unknown command {cmd!r}")


def state_of(daemon: NodeDaemon, module: str) -> State:
    return daemon.managers[module].state
