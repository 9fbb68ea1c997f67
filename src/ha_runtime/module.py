"""What a mirror module (`manager.MirrorModule`) and a farm module
(`farm_manager.FarmModule`) run the same way: the witness and checker loops, the
restart budget, scripts, and the operator's start/stop/restart with the admin-stopped file.

A subclass says what differs through a few hooks: whether the application runs here, whether
the module is started, what a checker with no restart left does, and which scripts start and
stop the application.
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
from ha_runtime.heartbeat.peers import PeerTable
from ha_runtime.scripts import ScriptResult, run_script, script_env
from ha_runtime.states import State

log = logging.getLogger(__name__)

# A checker must fail this many probes in a row before its action runs: one lost probe on
# a busy node is not a reason to restart an air-traffic application.
FAILURES_BEFORE_ACTION = 2


class CommandRefused(Exception):
    """An operator command that cannot be done now; nothing was changed."""


@dataclass(frozen=True)
class WitnessProbe:
    started: float  # clock() when the echoes left
    ok: bool


@dataclass
class CheckerStatus:
    ok: bool | None = None
    detail: str = "not run yet"
    failures: int = 0


class ModuleBase(ABC):
    """One module on this node: the runtime both module types share."""

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
        self.witness_ok: bool | None = None if not module.witness else True
        self._witness_probe: WitnessProbe | None = None
        # When a probe answered after one that did not: this node's own cut may just have
        # healed, and the peers' silence during it says nothing about them yet.
        self._witness_back_at: float | None = None
        self.checks: dict[str, CheckerStatus] = {c.name: CheckerStatus() for c in module.checkers}
        # Checkers holding this node out, with why (a mirror's `wait` ones, any farm one that
        # gave up); each leaves when it passes again.
        self.blocked: dict[str, str] = {}
        self.budget = checkers.RestartBudget(
            module.restart_policy.max_restarts, module.restart_policy.window_s
        )
        self._wake = trio.Event()
        self._lock = trio.Lock()  # one transition, start/stop or app restart at a time

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
        if self.m.witness:
            nursery.start_soon(self._witness_loop)
            nursery.start_soon(self._isolation_watch)
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
        path = getattr(self.m.scripts, which)
        if path is None:
            return None
        env = script_env(
            module=self.m.name,
            node=self.node,
            peer=self._script_peer(),
            script=which,
            transition=transition,
            reason=reason,
            vip=self.m.vip.cidr if self.m.vip else "",
        )
        return await run_script(path, env, self.m.scripts.timeout_s, label=f"{self.m.name}/{which}")

    # ----------------------------------------------------------------- monitors

    # A node cut from every network must stop serving *before* its peer's heartbeat timeout
    # lets the peer take over, or both serve for a while. So isolation is judged early:
    # once every peer has been silent for a third of the timeout, the witness is probed at
    # once, in a window short enough to release the VIP or buckets well inside the timeout.

    @property
    def _suspect_after_s(self) -> float:
        return self.m.heartbeat.timeout_ms / 1000 / 3

    @property
    def _witness_window_s(self) -> float:
        return min(1.0, max(0.1, self.m.heartbeat.timeout_ms / 1000 / 6))

    def _quiet_since(self) -> float | None:
        """When the last heartbeat of any peer arrived, if every peer heard since boot has
        been silent for the suspicion delay; None while one is heard."""
        heard = [self.peers.last_heard(self.m.name, p) for p in self._peer_names()]
        times = [t for t in heard if t is not None]
        if not times:
            return None  # never heard: nobody can be racing us for what we serve
        last = max(times)
        return last if self._clock() - last >= self._suspect_after_s else None

    def _witness_fresh(self) -> bool:
        """A witness probe sent once the peers' silence became suspicious has finished
        (answered or not). One sent earlier, even after their last heartbeat, may have left
        just before the cut that silenced them (timeout >= 3 x interval, so a third of the
        timeout without a heartbeat means the cut, if any, came before): it tells nothing.
        Found by the fault campaign: the periodic probe answered a moment before the cut,
        the watch took it as the verdict and the node released after the peer took over."""
        quiet = self._quiet_since()
        probe = self._witness_probe
        return (
            quiet is not None
            and probe is not None
            # the same form as _quiet_since's test, so a probe sent by the watch always counts
            and probe.started - quiet >= self._suspect_after_s
        )

    @property
    def isolated(self) -> bool:
        """Every peer is quiet and no witness answered a probe sent since: this node may be
        the one cut off, so it must release what it serves before a peer takes it over."""
        probe = self._witness_probe
        if not self.m.witness or probe is None:
            return False
        if self._witness_fresh() and not probe.ok:
            return True
        # Reconnected: the witness answers again, the peers are still quiet. They may have
        # taken over while we were cut off, and their heartbeats may not have arrived yet:
        # still isolated until they are heard, or for one heartbeat timeout (then they are
        # really gone). Found by the fault campaign: an isolated node whose witness came
        # back first took over with its old data while its peer was primary.
        quiet = self._quiet_since()
        back = self._witness_back_at
        return (
            quiet is not None
            and back is not None
            and back > quiet
            and self._clock() - back < self.m.heartbeat.timeout_ms / 1000
        )

    async def _probe_witness(self) -> bool:
        started = self._clock()
        ok = await checkers.any_reachable(self.m.witness, self._witness_window_s, attempts=4)
        latest = self._witness_probe
        # Two probes may overlap (periodic and isolation watch): the later-sent one counts.
        if latest is None or started >= latest.started:
            self._witness_probe = WitnessProbe(started, ok)
            if ok != self.witness_ok:
                log.info("%s: witness %s", self.m.name, "reachable" if ok else "unreachable")
                if ok:
                    self._witness_back_at = self._clock()
                self.witness_ok = ok
                self.wake()
            elif not ok:
                self.wake()  # an unanswered probe may make this node isolated now
        return ok

    async def _witness_loop(self) -> None:
        period = max(1.0, self.m.heartbeat.interval_ms / 1000)
        while True:
            await self._probe_witness()
            await trio.sleep(period)

    async def _isolation_watch(self) -> None:
        tick = max(0.02, min(self.m.heartbeat.interval_ms / 1000, self._witness_window_s) / 2)
        while True:
            if self._quiet_since() is not None and not self._witness_fresh():
                await self._probe_witness()
            await trio.sleep(tick)

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
                if self.blocked.pop(spec.name, None) is not None:
                    self._checker_passed(spec.name)
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
