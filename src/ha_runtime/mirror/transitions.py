"""A mirror module's decision loop: feeds the pure decision, applies it, follows it with the
replication children. `module.MirrorModule` adds the fencing, the operator commands and the
status on top.

Ordering rules that keep the VIP on one node at a time:
- promotion: claim the role first (our heartbeats say primary before anything else),
  persist the new data generation, then add the VIP, announce it, start the application;
- demotion: stop the application and release the VIP first, and only then announce the
  new state, so the peer never takes the VIP while we still hold it.
"""

from __future__ import annotations

import itertools
import logging
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import trio

from ha_runtime import vip
from ha_runtime.config import ClusterConfig, ModuleConfig
from ha_runtime.events import EventLog
from ha_runtime.generation import Generation, GenerationStore, GenRecord
from ha_runtime.heartbeat.peers import LocalAnnounce, PeerTable, PeerView
from ha_runtime.mirror.decision import Decision, Inputs, decide
from ha_runtime.mirror.supervisor import ReplicationError, ReplicationSupervisor
from ha_runtime.mirror.vip_ops import NetlinkVip, VipOps
from ha_runtime.module import ModuleBase
from ha_runtime.states import Flag, State

log = logging.getLogger(__name__)


@dataclass
class Control:
    """Operator requests and runtime verdicts that feed the decision (the admin stop and
    the checkers' blocks live in ModuleBase, which farm modules share)."""

    force_primary: bool = False
    accept_peer_data: bool = False
    swap_until: float = 0.0
    handover_until: float = 0.0
    yielding: str | None = None


class MirrorTransitions(ModuleBase):
    """A mirror module's state machine applied: one primary with the VIP and the
    application, one SECOND."""

    STOP_SCRIPT = "stop_prim"
    START_SCRIPT = "start_prim"
    NOT_RUNNING_DETAIL = "application not running here"

    def __init__(
        self,
        *,
        cluster: ClusterConfig,
        module: ModuleConfig,
        peers: PeerTable,
        events: EventLog,
        send_now: Callable[[str], Awaitable[None]],
        vip_ops: VipOps | None = None,
        on_transition: Callable[[str, State, State], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            cluster=cluster,
            module=module,
            peers=peers,
            events=events,
            send_now=send_now,
            on_transition=on_transition,
            clock=clock,
        )
        self.peer_name = module.peer_of(cluster.node)
        self.vip_ops: VipOps = vip_ops or NetlinkVip()
        self.store = GenerationStore(cluster.state_dir, module.name)
        self.record: GenRecord = self.store.load()
        self.ctl = Control()
        self.state = State.STOP if self.admin_stopped else State.WAIT
        # Announce eligibility from the first heartbeat: a peer must never take an
        # undecided, just-booted node for one that cannot run the application.
        self.flags = Flag.NONE if self.admin_stopped else Flag.ELIGIBLE
        # Replicated directories: one child process per directory (mirror.supervisor).
        self.replication: ReplicationSupervisor | None = None
        if module.replicated_dirs:
            self.replication = ReplicationSupervisor(cluster, module, self._on_replication_event)
            self.replication.generation = hex_generation(self.record.generation)
        self._nursery: trio.Nursery | None = None
        self._recovering = False  # a dead primary replication child is being restarted
        # When the current generation was taken (our clock): a peer that heard us since then
        # heard it. Unknown at start: from now, which only makes a fence wait longer.
        self._generation_since = clock()

    def announce(self) -> LocalAnnounce:
        return LocalAnnounce(self.state, self.flags, self.record.generation)

    def peer_view(self) -> PeerView:
        return self.peers.view(self.m.name, self.peer_name)

    def inputs(self) -> Inputs:
        now = self._clock()
        blocked = "; ".join(f"{k}: {v}" for k, v in sorted(self.blocked.items())) or None
        return Inputs(
            node=self.node,
            peer_name=self.peer_name,
            default_primary=self.m.default_primary or self.node,
            state=self.state,
            record=self.record,
            peer=self.peer_view(),
            admin_stopped=self.admin_stopped,
            blocked=blocked,
            yielding=self.ctl.yielding,
            handover=now < self.ctl.handover_until,
            swap_requested=now < self.ctl.swap_until,
            witness_ok=self.witness_ok,
            isolated=self.isolated,
            force_primary=self.ctl.force_primary,
            accept_peer_data=self.ctl.accept_peer_data,
            failback_auto=self.m.failback == "auto",
            failback_allowed=not self.budget.exhausted(now),
            replica_sync=self._replication_sync(),
            quarantine_on_split=self.replication is not None,
        )

    def _replication_sync(self) -> bool | None:
        if self.replication is None:
            return None
        return self.replication.in_sync(hex_generation(self.peer_view().generation))

    # ----------------------------------------------------------------- ModuleBase hooks

    def _app_running(self) -> bool:
        return self.state.is_primary

    def _module_started(self) -> bool:
        return self.state is not State.STOP

    def _peer_names(self) -> tuple[str, ...]:
        return (self.peer_name,)

    def _script_peer(self) -> str:
        return self.peer_name

    def _generation_label(self) -> str:
        return self.record.generation.short()

    def _operator_started(self) -> None:
        super()._operator_started()
        self.ctl.yielding = None  # a start is the operator's retry after a failover

    async def _withdraw(self, checker: str, detail: str) -> None:
        # No restart left: fail over, the peer runs the application.
        why = f"checker {checker}: {detail}"
        self._checker_event(checker, "failover", detail=why)
        self.ctl.yielding = why
        self.wake()

    # ----------------------------------------------------------------- main loop

    # What the replication children ask of the module: module.MirrorModule.

    @abstractmethod
    def _on_replication_event(self, index: int, kind: str, detail: dict[str, Any]) -> None:
        """An event or a new status of a replication child."""

    @abstractmethod
    def _check_replication(self) -> None:
        """Before a decision: react to a primary child that died."""

    @abstractmethod
    async def _replication_follow(self, new: State) -> None:
        """After a transition to a non-primary state: start or stop the children."""

    async def run(self) -> None:
        await self.vip_ops.remove(self.m)  # a VIP left by a crash is not ours until decided
        if not self.admin_stopped:
            await self._run_script("prestart", "STOP->WAIT", "module starting")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.replication is not None:
                await nursery.start(self.replication.run)
            self._start_monitors(nursery)
            while True:
                await self.step()
                self.settled = True  # any state after the first decision, WAIT included
                await self._wait_for_news()

    async def step(self) -> Decision:
        async with self._lock:
            now = self._clock()
            peer = self.peer_view()
            self._check_replication()
            if now >= self.ctl.handover_until or (peer.primary and self.ctl.handover_until):
                self.ctl.handover_until = 0.0
            d = decide(self.inputs())
            if d.state.is_primary and not peer.alive and self.m.witness:
                # Serving alone is judged on a probe sent since the peer went quiet, not on
                # the last periodic one (the isolation watch has usually sent it already).
                if not self.isolation.fresh():
                    await self.isolation.probe_witness()
                d = decide(self.inputs())
            if d.state is not self.state:
                await self._transition(d)
            else:
                self.reason = d.reason if d.reason != self.reason else self.reason
                self._save_generation(d)
            if self.flags != d.flags:
                self.flags = d.flags
                await self._send_now(self.m.name)
            return d

    # ----------------------------------------------------------------- applying a decision

    def _save_generation(self, d: Decision) -> None:
        rec = self.record
        if d.adopt_peer_generation:
            # Issue 4's replicator gates this on the end of resync; without it, a SECOND
            # follows the primary's copy by construction.
            rec = rec.with_generation(self.peer_view().generation)
        if d.new_generation:
            rec = rec.with_generation(rec.generation.advance())
        if d.peer_outdated is not None:
            rec = replace(rec, peer_outdated=d.peer_outdated)
        self._set_record(rec)

    def _set_record(self, rec: GenRecord) -> None:
        """Persist the record (fsync) before anything announces it, then pass it on."""
        if rec != self.record:
            self.store.save(rec)
            if rec.generation != self.record.generation:
                self._generation_since = self._clock()
            self.record = rec
            if self.replication is not None:
                # The primary's children declare the peer in sync under this generation.
                self.replication.generation = hex_generation(rec.generation)
                if self._nursery is not None and self.replication.role == "primary":
                    self._nursery.start_soon(
                        self.replication.set_generation, hex_generation(rec.generation)
                    )

    async def _transition(self, d: Decision) -> None:
        old, new = self.state, d.state
        label = f"{old.name}->{new.name}"
        log.info("%s: %s (%s)", self.m.name, label, d.reason)
        if d.start_handover:
            self.ctl.handover_until = self._clock() + max(
                5.0, 3 * self.m.heartbeat.timeout_ms / 1000
            )
        failures: list[str] = []
        if new.is_primary and not old.is_primary:
            self.state = new  # claim first
            self._save_generation(d)
            self.flags = d.flags
            await self._send_now(self.m.name)
            failures += await self._promote(label, d.reason)
        elif old.is_primary and not new.is_primary:
            failures += await self._demote(label, d.reason, vip_first=self.isolated)
            self._save_generation(d)
            self.state = new
        else:
            self._save_generation(d)
            self.state = new
        if new is State.STOP and old is not State.STOP:
            res = await self._run_script("poststop", label, d.reason)
            if res is not None and not res.ok:
                failures.append(res.describe())
        if old is State.STOP and new is not State.STOP:
            await self._run_script("prestart", label, d.reason)
        if d.state is State.SECOND:
            self.ctl.accept_peer_data = False
        if new.is_primary:
            self.ctl.force_primary = False
            self.ctl.swap_until = 0.0
        self.reason = d.reason
        self.last_transition = time.time()
        self.flags = d.flags
        self._transition_event(old, new, d.reason, failures)
        if self._on_transition is not None:
            self._on_transition(self.m.name, old, new)
        await self._send_now(self.m.name)
        await self._replication_follow(new)

    async def _promote(self, label: str, reason: str) -> list[str]:
        errors: list[str] = []
        # Each step's end, logged: the journal says where a slow promotion went.
        marks = [self._clock()] * (1 if self.replication is not None else 2)
        if self.replication is not None:
            # The application only ever sees its directories through the replicator.
            try:
                await self.replication.stop()  # the secondary's children (timed apart)
                marks.append(self._clock())
                await self.replication.start("primary")
            except ReplicationError as exc:
                errors.append(f"replication: {exc}")
                self.ctl.yielding = f"cannot start replication: {exc}"
                log.error("%s: %s", self.m.name, self.ctl.yielding)  # noqa: TRY400
                self.wake()
                return errors
        marks.append(self._clock())
        try:
            await self.vip_ops.add(self.m)
        except (OSError, vip.VipError) as exc:
            errors.append(f"VIP: {exc}")
            self.ctl.yielding = f"cannot add the VIP: {exc}"
            log.exception("%s: %s", self.m.name, self.ctl.yielding)
            self.wake()
            return errors
        marks.append(self._clock())
        res = await self._run_script("start_prim", label, reason)
        marks.append(self._clock())
        steps = " ".join(f"{b - a:.2f}" for a, b in itertools.pairwise(marks))
        log.info(
            "%s: promoted in %.2f s (children stopped, primary up, VIP, start_prim: %s s)",
            self.m.name, marks[-1] - marks[0], steps,
        )  # fmt: skip
        if res is not None and not res.ok:
            errors.append(res.describe())
            self.ctl.yielding = f"start_prim: {res.describe()}"
            self.wake()
        for c in self.checks.values():
            c.failures = 0
        return errors

    async def _demote(self, label: str, reason: str, *, vip_first: bool = False) -> list[str]:
        errors: list[str] = []
        if vip_first:
            # Isolated: the peer takes over on its own timeout, whatever we do; the VIP must be
            # gone by then, not after a stop script and a drain that may take seconds.
            await self._remove_vip(errors)
        res = await self._run_script("stop_prim", label, reason)
        if res is not None and not res.ok:
            # The VIP goes anyway: a half-stopped application must not keep clients.
            errors.append(res.describe())
        if self.replication is not None:
            # Application stopped: drain the peer, then unmount, before anyone takes over.
            await self.replication.stop()
        if not vip_first:
            await self._remove_vip(errors)
        return errors

    async def _remove_vip(self, errors: list[str]) -> None:
        try:
            await self.vip_ops.remove(self.m)
        except (OSError, vip.VipError) as exc:
            errors.append(f"VIP: {exc}")
            log.exception("%s: cannot remove the VIP", self.m.name)

    async def shutdown(self) -> None:
        """Daemon stopping: give the role up cleanly so the peer takes over at once."""
        async with self._lock:
            if self.state.is_primary:
                await self._demote(f"{self.state.name}->STOP", "daemon stopping")
            if self.replication is not None:
                await self.replication.stop()
            old = self.state
            self.state = State.STOP
            self.flags = Flag.NONE
            self._transition_event(old, State.STOP, "hapair daemon stopping", [])
            await self._send_now(self.m.name)


def hex_generation(g: Generation) -> str:
    """A generation as the replication children read and write it."""
    return f"{g.current:016x}"
