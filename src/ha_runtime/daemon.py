"""The node daemon: heartbeats, one module object per module, API, metrics, systemd notify.

The daemon holds one `ModuleBase` per module this node is part of, whatever its kind
(`mirror.module.MirrorModule`, `farm.module.FarmModule`), and asks each the same things:
run, announce, status, shutdown, and the operator's commands, which a kind refuses when
they are the other kind's.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import trio

from ha_runtime import api, release, sdnotify
from ha_runtime.config import ClusterConfig, ModuleConfig, SiteConfig
from ha_runtime.console.server import ConsoleServer
from ha_runtime.events import EventLog, RefusalLog
from ha_runtime.farm.module import FarmModule
from ha_runtime.heartbeat.packet import Drop
from ha_runtime.heartbeat.peers import LocalAnnounce, ModuleStream
from ha_runtime.heartbeat.service import HeartbeatService
from ha_runtime.metrics import Metrics
from ha_runtime.mirror.module import MirrorModule
from ha_runtime.mirror.vip_ops import VipOps
from ha_runtime.module import CommandRefused, ModuleBase
from ha_runtime.security import SiteKeys
from ha_runtime.version import runtime_version

log = logging.getLogger(__name__)

# READY=1 waits for every module's first decision, at most this long: a module stuck in a
# slow prestart must not keep the unit "activating" until systemd's start timeout kills it.
SETTLE_TIMEOUT_S = 60.0

# Every operation a module answers; a kind refuses the other kind's (drain on a mirror).
COMMANDS = ("start", "stop", "restart", "prim", "second", "swap", "drain", "undrain", "resync")


class NodeDaemon:
    def __init__(
        self,
        site: SiteConfig,
        key: bytes,
        *,
        vip_ops: VipOps | None = None,
        metrics: bool = True,
        pair_keys: dict[str, bytes] | None = None,  # heartbeat key per peer (heartbeat.keys)
        accepted_keys: tuple[bytes, ...] = (),  # other site keys, during a rotation (security)
    ) -> None:
        c = site.cluster
        self.cluster = c
        # Fingerprints only: the rotation playbook reads them to know what each daemon loaded.
        self._site_key_ids = SiteKeys(key, accepted_keys).ids()
        # Only modules this node is part of.
        configs: list[ModuleConfig] = []
        for m in site.modules:
            if c.node in m.nodes and m.type in ("mirror", "farm"):
                configs.append(m)
            else:
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
            for m in configs
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
            accepted_keys=accepted_keys,
        )
        self.modules: dict[str, ModuleBase] = {m.name: self._module(c, m, vip_ops) for m in configs}
        self.release_plan = release.release_plan(c.node, configs)
        self.ready = trio.Event()  # API and heartbeats up
        self.settle_timeout_s = SETTLE_TIMEOUT_S
        self.console: ConsoleServer | None = None  # when cluster.yml configures one

    def _module(self, c: ClusterConfig, m: ModuleConfig, vip_ops: VipOps | None) -> ModuleBase:
        if m.type == "farm":
            return FarmModule(
                cluster=c,
                module=m,
                peers=self.heartbeat.table,
                events=self.events,
                send_now=self.heartbeat.send_now,
                on_transition=self.metrics.on_transition,
            )
        return MirrorModule(
            cluster=c,
            module=m,
            peers=self.heartbeat.table,
            events=self.events,
            send_now=self.heartbeat.send_now,
            vip_ops=vip_ops,
            on_transition=self.metrics.on_transition,
        )

    def _on_heartbeat_drop(self, reason: Drop) -> None:
        self.metrics.on_drop(reason)
        self._refusals(reason.value)

    def _announce(self, module: str) -> LocalAnnounce:
        return self.modules[module].announce()

    async def run(self) -> None:
        self.metrics.set_build(self.cluster.node)
        # Before any module can install a VIP or a bucket: what to undo if we are killed.
        release.write_plan(self.cluster.state_dir, self.release_plan)
        if self._serve_metrics and self.cluster.metrics_address:
            self.metrics.serve(self.cluster.metrics_address)
        for name, mod in self.modules.items():
            self.metrics.set_state(name, mod.state)
            self.events.append(name, "daemon_start", node=self.cluster.node, state=mod.state.name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.heartbeat.run)
            await self.heartbeat.ready.wait()
            await nursery.start(api.serve, self.cluster.api_socket, self.handle)
            if self.cluster.console is not None:
                self.console = ConsoleServer(self, self.cluster.console)
                await nursery.start(self.console.serve)
            async with trio.open_nursery() as modules:
                for mod in self.modules.values():
                    modules.start_soon(mod.run)
                nursery.start_soon(self._watch_signals, modules.cancel_scope, nursery.cancel_scope)
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._peer_gauges)
                self.ready.set()
                nursery.start_soon(self._notify_ready)
            # Modules cancelled by a signal: hand every role over cleanly, tell the peer.
            sdnotify.notify("STOPPING=1")
            with trio.CancelScope(shield=True):
                for mod in self.modules.values():
                    await mod.shutdown()
            nursery.cancel_scope.cancel()

    def _unsettled(self) -> list[str]:
        return [f"{name} ({m.state.name})" for name, m in self.modules.items() if not m.settled]

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
        states = ", ".join(f"{name} {m.state.name}" for name, m in self.modules.items())
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
            for name, mod in self.modules.items():
                self.metrics.peer_alive.labels(name).set(1 if mod.peer_alive else 0)
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
            # The watchdog is fed from the same trio loop as the modules: a wedged loop
            # stops the pings and systemd restarts us.
            sdnotify.notify("WATCHDOG=1")
            await trio.sleep(period)

    # ----------------------------------------------------------------- API

    def status(self, module: str | None = None) -> dict[str, Any]:
        if module:
            entries = [self.module(module).status()]
        else:
            entries = [m.status() for m in self.modules.values()]
        return {
            "node": self.cluster.node,
            "version": runtime_version(),
            "networks": list(self.cluster.networks),  # heartbeat networks (advice: which down)
            "modules": entries,
            "heartbeat_drops": dict(self.heartbeat.drops),
            "heartbeat_accepted_key": self.heartbeat.accepted_key_packets,
            "site_keys": self._site_key_ids,
        }

    def module(self, name: Any) -> ModuleBase:
        """The module of that name on this node; ApiError names the known ones."""
        if not isinstance(name, str) or name not in self.modules:
            known = ", ".join(sorted(self.modules)) or "none"
            raise api.ApiError(f"unknown module {name!r} on {self.cluster.node} (known: {known})")
        return self.modules[name]

    async def handle(self, req: dict[str, Any]) -> Any:
        cmd = req["command"]
        name = req.get("module")
        if cmd == "status":
            # Unknown module: refused by status(), after nothing was refreshed.
            for mod in self.modules.values() if name is None else []:
                await mod.refresh()
            if name in self.modules:
                await self.modules[name].refresh()
            return self.status(name)
        if cmd == "events":
            if name is not None:
                self.module(name)
            limit = req.get("limit")
            return self.events.read(name, limit if isinstance(limit, int) else None)
        if cmd not in (*COMMANDS, "verify"):
            raise api.ApiError(f"unknown command {cmd!r}")
        mod = self.module(name)
        try:
            if cmd == "verify":
                result: dict[str, Any] = await mod.cmd_verify()
                return result
            if cmd == "resync":
                message = await mod.cmd_resync(full=bool(req.get("full")))
            else:
                message = await getattr(mod, f"cmd_{cmd}")()
        except CommandRefused as exc:
            raise api.ApiError(str(exc)) from exc
        return {"message": message, "status": mod.status()}
