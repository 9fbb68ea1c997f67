"""One module on this node, whatever its kind: what the daemon, the API, the console and the
metrics call, and what a mirror module (`mirror.module.MirrorModule`) and a farm module
(`farm.module.FarmModule`) run the same way: the witness watch (`isolation`), the checker
loops, the restart budget, scripts, the operator's start/stop/restart with the admin-stopped
file, and the status fields every kind has.

A kind says what differs through a few hooks: whether the application runs here, whether
the module is started, what a checker with no restart left does, which scripts start and
stop the application, and its own operations (switchover for a mirror, drain for a farm),
refusing those of the other kind with a message that says what to do instead.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from ha_runtime import checkers
from ha_runtime.config import CheckerSpec, ClusterConfig, ModuleConfig
from ha_runtime.events import EventLog
from ha_runtime.heartbeat.peers import LocalAnnounce, PeerTable
from ha_runtime.isolation import IsolationWatch
from ha_runtime.scripts import ScriptResult, run_script, script_env
from ha_runtime.states import State

log = logging.getLogger(__name__)

# A checker must fail this many probes in a row before its action runs: one lost probe on
# a busy node is not a reason to restart an air-traffic application.
FAILURES_BEFORE_ACTION = 2


class CommandRefused(Exception):
    """An operator command that cannot be done now; nothing was changed."""


@dataclass
class CheckerStatus:
    ok: bool | None = None
    detail: str = "not run yet"
    failures: int = 0


class ModuleBase(ABC):
    """One module on this node: the runtime both module kinds share."""

    # The module's `type` in the module file and in the status.
    KIND: ClassVar[str]
    # The scripts that stop and start the application for a local restart.
    STOP_SCRIPT: ClassVar[str]
    START_SCRIPT: ClassVar[str]
    # What an app-level checker reports while the application does not run here.
    NOT_RUNNING_DETAIL: ClassVar[str]

    def __init__(
        self,
        *,
        cluster: ClusterConfig,
        module: ModuleConfig,
        peers: PeerTable,
        events: EventLog,
        send_now: Callable[[str], Awaitable[None]],
        on_transition: Callable[[str, State, State], None] | None,
        clock: Callable[[], float],
    ) -> None:
        self.cluster = cluster
        self.m = module
        self.node = cluster.node
        self.peers = peers
        self.events = events
        self._send_now = send_now
        self._on_transition = on_transition
        self._clock = clock
        # A stop survives a reboot: the operator stopped the module, not the daemon.
        self.admin_file = cluster.state_dir / f"{module.name}.stopped"
        self.admin_stopped = self.admin_file.exists()
        self.state = State.STOP
        # Set once the module made its first decision: what the daemon's READY=1 waits for.
        self.settled = False
        self.reason = "daemon started"
        self.last_transition = time.time()
        self.isolation = IsolationWatch(
            module=module, peers=peers, peer_names=self._peer_names, clock=clock, wake=self.wake
        )
        self.checks: dict[str, CheckerStatus] = {c.name: CheckerStatus() for c in module.checkers}
        # Checkers holding this node out, with why (a mirror's `wait` ones, any farm one that
        # gave up); each leaves when it passes again.
        self.blocked: dict[str, str] = {}
        self.budget = checkers.RestartBudget(
            module.restart_policy.max_restarts, module.restart_policy.window_s
        )
        self.grace = checkers.StartGrace()
        self._wake = trio.Event()
        self._lock = trio.Lock()  # one transition, start/stop or app restart at a time

    # ----------------------------------------------------------------- what the daemon calls

    @abstractmethod
    async def run(self) -> None:
        """Run the module until cancelled (the daemon's nursery)."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Daemon stopping: give up what this node serves so the peers take over at once."""

    @abstractmethod
    def announce(self) -> LocalAnnounce:
        """What this node says about the module in its next heartbeat."""

    @property
    @abstractmethod
    def peer_alive(self) -> bool:
        """A peer of the module is heard (for a farm: any of them)."""

    async def refresh(self) -> None:  # noqa: B027 - most kinds have nothing to refresh
        """Bring `status()` up to date where it reads a slower source (farm counters)."""

    def heartbeat_networks(self) -> list[str] | None:
        """The networks the single peer is heard on, for the per-network gauge; None for a
        module with several peers (the gauge has no peer label)."""
        return None

    def replication_metrics(self) -> tuple[dict[str, Any], dict[int, dict[str, Any]]] | None:
        """The replication summary and each child's raw status; None: nothing replicated."""
        return None

    def refusal(self, action: str) -> str | None:
        """Why `action` would be refused now, judged without acting (the console's
        confirmation page says it before anyone confirms); None: it would be tried."""
        return None

    # Operations of one kind only: the other kind refuses them, saying what to do instead.

    @abstractmethod
    async def cmd_prim(self) -> str: ...

    @abstractmethod
    async def cmd_second(self) -> str: ...

    @abstractmethod
    async def cmd_swap(self) -> str: ...

    @abstractmethod
    async def cmd_drain(self) -> str: ...

    @abstractmethod
    async def cmd_undrain(self) -> str: ...

    @abstractmethod
    async def cmd_verify(self) -> dict[str, Any]: ...

    @abstractmethod
    async def cmd_resync(self, full: bool = False) -> str: ...

    # ----------------------------------------------------------------- status

    @property
    def witness_ok(self) -> bool | None:
        return self.isolation.witness_ok

    @property
    def isolated(self) -> bool:
        return self.isolation.isolated

    def blocked_reason(self) -> str | None:
        """The checkers holding this node out, with why; None when none does."""
        return "; ".join(f"{k}: {v}" for k, v in sorted(self.blocked.items())) or None

    def status(self) -> dict[str, Any]:
        """What `hactl status`, the console, the metrics and the advice read: the fields
        every kind has (peer, peer_state, ..., sync, eligible from `_kind_status`), then the
        kind's own."""
        return {
            "module": self.m.name,
            "name": self.m.name,
            "type": self.KIND,
            "node": self.node,
            "state": self.state.name,
            "vip": self.m.vip.cidr if self.m.vip else None,
            "last_transition": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_transition)
            ),
            "reason": self.reason,
            "witness_ok": self.witness_ok,
            "blocked": self.blocked_reason(),
            "restarts_in_window": self.budget.used(self._clock()),
            "checkers": [
                {"name": n, "ok": c.ok, "detail": c.detail} for n, c in sorted(self.checks.items())
            ],
            **self._kind_status(),
        }

    @abstractmethod
    def _kind_status(self) -> dict[str, Any]:
        """peer, peer_state, peer_alive, peer_networks, vip_held, sync, eligible, and the
        fields of this kind only."""

    # ----------------------------------------------------------------- hooks

    @abstractmethod
    def _app_running(self) -> bool:
        """The application runs here: app-level checkers probe it, a restart restarts it."""

    @abstractmethod
    def _module_started(self) -> bool:
        """The module is started here (what `hactl start`/`stop` wait for)."""

    @abstractmethod
    def _peer_names(self) -> tuple[str, ...]:
        """The other nodes of the module (whose silence may mean this node is cut off)."""

    @abstractmethod
    def _script_peer(self) -> str:
        """HAPAIR_PEER for the scripts."""

    @abstractmethod
    def _generation_label(self) -> str:
        """The `generation` field of transition events."""

    @abstractmethod
    async def _withdraw(self, checker: str, detail: str) -> None:
        """A checker failed and no restart is left or allowed: stop serving from here."""

    def _operator_started(self) -> None:
        """`hactl start` was asked: clear what the operator's start overrides."""
        self.admin_stopped = False

    def _checker_passed(self, checker: str) -> None:
        """A checker that held this node out passes again."""
        self.wake()

    async def _restart_module(self) -> str:
        """`hactl restart` where the application does not run: stop, then start."""
        await self.cmd_stop()
        return await self.cmd_start()

    # ----------------------------------------------------------------- main loop helpers

    def wake(self) -> None:
        self._wake.set()

    def _start_monitors(self, nursery: trio.Nursery) -> None:
        self.isolation.start(nursery)
        for spec in self.m.checkers:
            nursery.start_soon(self._checker_loop, spec)

    async def _wait_for_news(self) -> None:
        """Sleep until woken, a peer's heartbeat changes, or one heartbeat interval passes."""
        self._wake = trio.Event()
        changed = self.peers.changed[self.m.name]
        with trio.move_on_after(self.m.heartbeat.interval_ms / 1000):
            async with trio.open_nursery() as waiters:
                waiters.start_soon(_wait_then_cancel, self._wake, waiters.cancel_scope)
                waiters.start_soon(_wait_then_cancel, changed, waiters.cancel_scope)

    def _transition_event(self, old: State, new: State, reason: str, errors: list[str]) -> None:
        self.events.append(
            self.m.name,
            "transition",
            node=self.node,
            **{"from": old.name, "to": new.name},
            reason=reason,
            generation=self._generation_label(),
            errors=errors,
        )

    async def _run_script(self, which: str, transition: str, reason: str) -> ScriptResult | None:
        if which == self.STOP_SCRIPT:
            self.grace.stopped()
        path, res = getattr(self.m.scripts, which), None
        if path is not None:
            env = script_env(
                module=self.m.name,
                node=self.node,
                peer=self._script_peer(),
                script=which,
                transition=transition,
                reason=reason,
                vip=self.m.vip.cidr if self.m.vip else "",
            )
            label = f"{self.m.name}/{which}"
            res = await run_script(path, env, self.m.scripts.timeout_s, label=label)
        if which == self.START_SCRIPT:
            self.grace.started(self._clock())
        return res

    # ----------------------------------------------------------------- monitors

    async def _checker_loop(self, spec: CheckerSpec) -> None:
        st = self.checks[spec.name]
        while True:
            await trio.sleep(spec.interval_s)
            if spec.app_level and not self._app_running():
                st.ok, st.detail, st.failures = None, self.NOT_RUNNING_DETAIL, 0
                continue
            ok, detail = await checkers.probe(spec)
            st.ok, st.detail = ok, detail
            st.failures = 0 if ok else st.failures + 1
            if ok:
                self.grace.passed(spec.name)
                if self.blocked.pop(spec.name, None) is not None:
                    self._checker_passed(spec.name)
                continue
            if spec.app_level and self.grace.holds(spec, self._clock()):
                st.failures, st.detail = 0, f"{detail} (the application is starting)"
                continue
            if st.failures >= FAILURES_BEFORE_ACTION:
                await self._checker_failed(spec, detail)

    async def _checker_failed(self, spec: CheckerSpec, detail: str) -> None:
        name = spec.name
        if spec.action == "wait":
            self._block(name, detail)
            return
        # A blocked `restart` checker already gave up; it waits to pass, not to restart.
        if spec.action == "restart" and name not in self.blocked:
            if self.budget.try_restart(self._clock()):
                self._checker_event(name, "restart", detail=detail)
                await self.restart_application(f"checker {name}: {detail}")
                self.checks[name].failures = 0
                return
            detail += f" ({self.budget.max_restarts} restarts used in the window)"
        await self._withdraw(name, detail)

    def _checker_event(self, checker: str, action: str, **fields: Any) -> None:
        self.events.append(
            self.m.name, "checker", node=self.node, checker=checker, action=action, **fields
        )

    def _block(self, checker: str, detail: str) -> None:
        """Hold this node out until the checker passes (announced once, not every probe)."""
        if checker not in self.blocked:
            self._checker_event(checker, "wait", detail=detail)
            self.blocked[checker] = detail
            self.wake()

    async def restart_application(self, reason: str) -> None:
        async with self._lock:
            if not self._app_running():
                return
            label = f"{self.state.name}->{self.state.name}"
            await self._run_script(self.STOP_SCRIPT, label, reason)
            res = await self._run_script(self.START_SCRIPT, label, reason)
            self.events.append(
                self.m.name, "restart", node=self.node, reason=reason, ok=res is None or res.ok
            )

    # ----------------------------------------------------------------- operator commands

    async def _await_state(self, wanted: Callable[[], bool], timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not wanted():
                self.wake()
                await trio.sleep(0.05)
            return True
        return False

    def _transition_timeout(self) -> float:
        # Long enough for a stop script, a start script and the peer to notice.
        return 2 * self.m.scripts.timeout_s + 3 * self.m.heartbeat.timeout_ms / 1000 + 5

    async def cmd_start(self) -> str:
        self._operator_started()
        self.admin_file.unlink(missing_ok=True)
        self.events.append(self.m.name, "command", node=self.node, command="start")
        self.wake()
        await self._await_state(self._module_started, self._transition_timeout())
        return f"{self.m.name} started on {self.node}: {self.state.name} ({self.reason})"

    async def cmd_stop(self) -> str:
        self.admin_stopped = True
        self.admin_file.parent.mkdir(parents=True, exist_ok=True)
        self.admin_file.touch()
        self.events.append(self.m.name, "command", node=self.node, command="stop")
        self.wake()
        if not await self._await_state(
            lambda: not self._module_started(), self._transition_timeout()
        ):
            raise CommandRefused(
                f"{self.m.name} did not reach STOP in time (now {self.state.name})"
            )
        return f"{self.m.name} stopped on {self.node}"

    async def cmd_restart(self) -> str:
        self.events.append(self.m.name, "command", node=self.node, command="restart")
        if self._app_running():
            await self.restart_application("operator restart")
            return f"{self.m.name}: application restarted on {self.node}"
        return await self._restart_module()


async def _wait_then_cancel(ev: trio.Event, scope: trio.CancelScope) -> None:
    await ev.wait()
    scope.cancel()
