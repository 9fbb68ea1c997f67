"""Per-module runtime: feeds the pure decision, applies it, runs checkers and commands.

Ordering rules that keep the VIP on one node at a time:
- promotion: claim the role first (our heartbeats say primary before anything else),
  persist the new data generation, then add the VIP, announce it, start the application;
- demotion: stop the application and release the VIP first, and only then announce the
  new state, so the peer never takes the VIP while we still hold it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import trio

from ha_runtime import vip
from ha_runtime.config import ClusterConfig, ModuleConfig
from ha_runtime.events import EventLog
from ha_runtime.generation import Generation, GenerationStore, GenRecord, Relation
from ha_runtime.heartbeat.peers import LocalAnnounce, PeerStatus, PeerTable, PeerView
from ha_runtime.mirror.decision import Decision, Inputs, decide, peer_ready, swap_refusal
from ha_runtime.mirror.supervisor import ReplicationError, ReplicationSupervisor
from ha_runtime.module import CommandRefused, ModuleBase
from ha_runtime.states import Flag, State

# CommandRefused is raised here and caught by the daemon, which imports it from here.
__all__ = ["CommandRefused", "MirrorModule", "NetlinkVip", "VipOps"]

log = logging.getLogger(__name__)


class VipOps(Protocol):
    async def add(self, m: ModuleConfig) -> None: ...
    async def remove(self, m: ModuleConfig) -> None: ...
    def held(self, m: ModuleConfig) -> bool | None: ...


class NetlinkVip:
    async def add(self, m: ModuleConfig) -> None:
        if m.vip is None:
            return
        await trio.to_thread.run_sync(vip.add_vip, m.vip)
        # Announce in the background: the application starts while the ARP bursts go out.
        trio.lowlevel.spawn_system_task(vip.announce, m.vip)

    async def remove(self, m: ModuleConfig) -> None:
        if m.vip is not None:
            await trio.to_thread.run_sync(vip.remove_vip, m.vip)

    def held(self, m: ModuleConfig) -> bool | None:
        if m.vip is None:
            return None
        try:
            return vip.has_vip(m.vip)
        except (OSError, vip.VipError):
            return None


@dataclass
class Control:
    """Operator requests and runtime verdicts that feed the decision (the admin stop and
    the checkers' blocks live in ModuleBase, which farm modules share)."""

    force_primary: bool = False
    accept_peer_data: bool = False
    swap_until: float = 0.0
    handover_until: float = 0.0
    yielding: str | None = None


class MirrorModule(ModuleBase):
    """A mirror module: one primary with the VIP and the application, one SECOND."""

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
        self.replica: ReplicationSupervisor | None = None
        if module.replicated_dirs:
            self.replica = ReplicationSupervisor(cluster, module, self._on_replica_event)
            self.replica.generation = _hex(self.record.generation)
        self._nursery: trio.Nursery | None = None
        self._recovering = False  # a dead primary replication child is being restarted
        # When the current generation was taken (our clock): a peer that heard us since then
        # heard it. Unknown at start: from now, which only makes a fence wait longer.
        self._generation_since = clock()

    # ----------------------------------------------------------------- inputs

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
            replica_sync=self._replica_sync(),
            quarantine_on_split=self.replica is not None,
        )

    def _replica_sync(self) -> bool | None:
        if self.replica is None:
            return None
        return self.replica.in_sync(_hex(self.peer_view().generation))

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

    async def run(self) -> None:
        await self.vip_ops.remove(self.m)  # a VIP left by a crash is not ours until decided
        if not self.admin_stopped:
            await self._run_script("prestart", "STOP->WAIT", "module starting")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.replica is not None:
                await nursery.start(self.replica.run)
            self._start_monitors(nursery)
            while True:
                await self.step()
                self.settled = True  # any state after the first decision, WAIT included
                await self._wait_for_news()

    async def step(self) -> Decision:
        async with self._lock:
            now = self._clock()
            peer = self.peer_view()
            self._check_replica()
            if now >= self.ctl.handover_until or (peer.primary and self.ctl.handover_until):
                self.ctl.handover_until = 0.0
            d = decide(self.inputs())
            if d.state.is_primary and not peer.alive and self.m.witness:
                # Serving alone is judged on a probe sent since the peer went quiet, not on
                # the last periodic one (the isolation watch has usually sent it already).
                if not self._witness_fresh():
                    await self._probe_witness()
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

    # ----------------------------------------------------------------- applying

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
            if self.replica is not None:
                # The primary's children declare the peer in sync under this generation.
                self.replica.generation = _hex(rec.generation)
                if self._nursery is not None and self.replica.role == "primary":
                    self._nursery.start_soon(self.replica.set_generation, _hex(rec.generation))

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
        await self._replica_follow(new)

    async def _replica_follow(self, new: State) -> None:
        """A SECOND receives into its backing directories; other non-primary states don't
        (the primary's children are started and stopped by _promote/_demote)."""
        if self.replica is None or new.is_primary:
            return
        if new is State.SECOND:
            try:
                await self.replica.start("secondary")
            except ReplicationError as exc:
                log.error("%s: cannot receive replication: %s", self.m.name, exc)  # noqa: TRY400
                self.events.append(
                    self.m.name, "replication", node=self.node, kind="error", reason=str(exc)
                )
        elif self.replica.role is not None:
            await self.replica.stop()

    def _check_replica(self) -> None:
        if self.replica is None or self.ctl.yielding is not None or self._recovering:
            return
        failed = self.replica.failed_primary()
        if failed is None or not self.state.is_primary:
            return
        self.events.append(self.m.name, "replication", node=self.node, kind="failed", reason=failed)
        # The application lost its directories with the child. A peer in sync takes over;
        # one that is not (resyncing, behind) cannot, and stepping down would leave nobody
        # serving: restart the replicator and the application here instead, within budget.
        if peer_ready(self.inputs()) or self._nursery is None:
            self.ctl.yielding = failed
        elif not self.budget.try_restart(self._clock()):
            self.ctl.yielding = f"{failed} ({self.budget.max_restarts} restarts used in the window)"
        else:
            self._recovering = True
            self._nursery.start_soon(self._restart_replication, failed)

    async def _restart_replication(self, why: str) -> None:
        """Remount through a new replication child (its dirty log on disk still records what
        the peer lacks) and restart the application on it, keeping the VIP."""
        assert self.replica is not None
        try:
            async with self._lock:
                if not self.state.is_primary:
                    return
                label = f"{self.state.name}->{self.state.name}"
                await self._run_script("stop_prim", label, why)
                await self.replica.stop()
                try:
                    await self.replica.start("primary")
                except ReplicationError as exc:
                    self.ctl.yielding = f"cannot restart replication: {exc}"
                    return
                res = await self._run_script("start_prim", label, why)
                self.events.append(
                    self.m.name, "restart", node=self.node,
                    reason=f"replication restarted here (peer not in sync): {why}",
                    ok=res is None or res.ok,
                )  # fmt: skip
        finally:
            self._recovering = False
            self.wake()

    def _on_replica_event(self, index: int, kind: str, detail: dict[str, Any]) -> None:
        """Events of the replication children: audit log, journal, and a fresh decision."""
        if kind == "__fence__":
            if self._nursery is not None:
                self._nursery.start_soon(
                    self._fence_peer, index, str(detail["token"]), detail.get("declared")
                )
            return
        if kind != "__state__":
            where = str(self.m.replicated_dirs[index])
            fields = {k: v for k, v in detail.items() if k not in ("node", "dir", "kind")}
            if kind == "split_brain_quarantine":
                log.error(
                    "%s: SPLIT BRAIN: diverging files of %s kept in %s (operator: see"
                    " docs/replication.md)",
                    self.m.name,
                    where,
                    detail.get("directory"),
                )
            self.events.append(
                self.m.name, "replication", node=self.node, dir=where, kind=kind, **fields
            )
        self.wake()

    # ----------------------------------------------------------------- fencing the peer

    async def _fence_peer(self, index: int, token: str, declared: str | None) -> None:
        """A primary child is about to acknowledge an fsync the peer does not hold: answer
        once the peer cannot take over on its old copy without it (docs/replication.md,
        acknowledgement rule). Never answered while not primary: the child is being
        stopped, and its waiting fsyncs fail with the mount."""
        fence_start = self._clock()
        while True:
            await self.step()  # the child's new state (sent just before): PRIM -> ALONE
            async with self._lock:
                if not self._fence_holds_role():
                    return
                if self.state is State.ALONE and (
                    declared == _hex(self.record.generation) or not self.record.peer_outdated
                ):
                    # ALONE, yet the peer may hold this generation (the child declared it in
                    # sync): a new one the peer's copy never had, durable before announced.
                    self._set_record(
                        replace(
                            self.record.with_generation(self.record.generation.advance()),
                            peer_outdated=True,
                        )
                    )
                    await self._send_now(self.m.name)
                    self.events.append(
                        self.m.name, "generation", node=self.node, reason="peer fenced off",
                        generation=self.record.generation.short(),
                    )  # fmt: skip
                wait = self._fence_wait() if self.state is State.ALONE else 0.05
                fenced = self.state is State.ALONE and wait <= 0
            if fenced:
                break
            await trio.sleep(max(wait, 0.01))
        assert self.replica is not None
        log.info(
            "%s: peer fenced off its old copy for %s after %.2f s (generation %s)",
            self.m.name, self.m.replicated_dirs[index], self._clock() - fence_start,
            self.record.generation.short(),
        )  # fmt: skip
        await self.replica.fenced(index, token)

    def _fence_holds_role(self) -> bool:
        return self.state.is_primary and self.replica is not None and self.replica.role == "primary"

    def _fence_wait(self) -> float:
        """Seconds until the peer can no longer take our previous generation for current.

        Every heartbeat sent since `_generation_since` carries the current generation. A peer
        that hears us at all hears it within the heartbeat timeout; one that does not has
        timed us out by then, and its own promotion starts a generation of its own, which the
        comparison shows as diverged (a split brain, quarantined, never silent). A peer
        silent for a whole timeout already when we took the generation (a failover: it is
        dead, or cut off and timing us out) needs no wait."""
        hb = self.m.heartbeat
        timeout = hb.timeout_ms / 1000
        heard = self.peers.last_heard(self.m.name, self.peer_name)
        if heard is None or heard <= self._generation_since - timeout:
            return 0.0
        # One interval more: a heartbeat read before the change may leave just after it.
        return self._generation_since + timeout + hb.interval_ms / 1000 - self._clock()

    async def _promote(self, label: str, reason: str) -> list[str]:
        errors: list[str] = []
        if self.replica is not None:
            # The application only ever sees its directories through the replicator.
            try:
                await self.replica.start("primary")
            except ReplicationError as exc:
                errors.append(f"replication: {exc}")
                self.ctl.yielding = f"cannot start replication: {exc}"
                log.error("%s: %s", self.m.name, self.ctl.yielding)  # noqa: TRY400
                self.wake()
                return errors
        try:
            await self.vip_ops.add(self.m)
        except (OSError, vip.VipError) as exc:
            errors.append(f"VIP: {exc}")
            self.ctl.yielding = f"cannot add the VIP: {exc}"
            log.exception("%s: %s", self.m.name, self.ctl.yielding)
            self.wake()
            return errors
        res = await self._run_script("start_prim", label, reason)
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
        if self.replica is not None:
            # Application stopped: drain the peer, then unmount, before anyone takes over.
            await self.replica.stop()
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
            if self.replica is not None:
                await self.replica.stop()
            old = self.state
            self.state = State.STOP
            self.flags = Flag.NONE
            self._transition_event(old, State.STOP, "hapair daemon stopping", [])
            await self._send_now(self.m.name)

    # ----------------------------------------------------------------- operator commands

    async def cmd_prim(self) -> str:
        i = self.inputs()
        if self.state.is_primary:
            return f"{self.m.name} is already primary on {self.node} ({self.state.name})"
        if i.peer.primary:
            raise CommandRefused(
                f"{self.peer_name} is primary: use `hactl swap {self.m.name}` for a switchover;"
                " nothing changed"
            )
        if i.admin_stopped:
            raise CommandRefused(
                f"{self.m.name} is stopped here: `hactl start {self.m.name}` first"
            )
        if i.blocked:
            raise CommandRefused(f"this node is not eligible ({i.blocked}); nothing changed")
        self.ctl.yielding = None
        if i.relation is not Relation.SAME or not i.peer.alive:
            self.ctl.force_primary = True  # the operator vouches for this copy
        self.events.append(
            self.m.name, "command", node=self.node, command="prim", relation=i.relation.value
        )
        self.wake()
        if not await self._await_state(lambda: self.state.is_primary, self._transition_timeout()):
            self.ctl.force_primary = False
            raise CommandRefused(f"{self.m.name} did not become primary: {self.reason}")
        return f"{self.m.name} is {self.state.name} on {self.node}"

    async def cmd_second(self) -> str:
        if self.state.is_primary:
            return await self.cmd_swap()
        if self.state is State.SECOND:
            return f"{self.m.name} is already SECOND on {self.node}"
        i = self.inputs()
        if not i.peer.primary:
            raise CommandRefused(
                f"{self.peer_name} is not primary: nothing to follow; nothing changed"
            )
        self.ctl.accept_peer_data = True
        self.events.append(
            self.m.name, "command", node=self.node, command="second", relation=i.relation.value
        )
        self.wake()
        if not await self._await_state(
            lambda: self.state is State.SECOND, self._transition_timeout()
        ):
            raise CommandRefused(f"{self.m.name} did not become SECOND: {self.reason}")
        return f"{self.m.name} is SECOND on {self.node}"

    async def cmd_swap(self) -> str:
        i = self.inputs()
        refusal = swap_refusal(i)
        if refusal is not None:
            raise CommandRefused(f"swap {self.m.name} refused: {refusal}")
        was_primary = self.state.is_primary
        self.events.append(self.m.name, "command", node=self.node, command="swap")
        started = time.monotonic()
        self.ctl.swap_until = self._clock() + self._transition_timeout()
        self.wake()

        def done() -> bool:
            p = self.peer_view()
            if was_primary:
                return self.state is State.SECOND and p.primary
            return self.state.is_primary

        ok = await self._await_state(done, self._transition_timeout())
        self.ctl.swap_until = 0.0
        if not ok:
            raise CommandRefused(
                f"swap {self.m.name} did not complete: now {self.state.name}, peer "
                f"{_state_name(self.peer_view())} ({self.reason})"
            )
        new_primary = self.peer_name if was_primary else self.node
        return f"{self.m.name} switched over to {new_primary} in {time.monotonic() - started:.1f}s"

    # ----------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        p = self.peer_view()
        i = self.inputs()
        return {
            "module": self.m.name,
            "name": self.m.name,
            "type": self.m.type,
            "node": self.node,
            "state": self.state.name,
            "peer": self.peer_name,
            "peer_state": _state_name(p) if p.status is not PeerStatus.NEVER else "UNKNOWN",
            "peer_alive": p.alive,
            "peer_networks": self.peers.networks_alive(self.m.name, self.peer_name),
            "vip": self.m.vip.cidr if self.m.vip else None,
            "vip_held": self.state.is_primary,
            "last_transition": _iso(self.last_transition),
            "reason": self.reason,
            "sync": _sync_word(self.state, i.relation, self.replica is not None),
            "generation": self.record.generation.short(),
            "peer_generation": p.generation.short() if p.status is not PeerStatus.NEVER else None,
            "data": i.relation.value if p.status is not PeerStatus.NEVER else "unknown",
            "eligible": i.eligible,
            "witness_ok": self.witness_ok,
            "blocked": i.blocked,
            "yielding": i.yielding,
            "restarts_in_window": self.budget.used(self._clock()),
            "checkers": [
                {"name": n, "ok": c.ok, "detail": c.detail} for n, c in sorted(self.checks.items())
            ],
            "replication": self.replica.status(_hex(p.generation))
            if self.replica is not None
            else None,
        }

    # ----------------------------------------------------------------- replication commands

    def _replica_primary(self, what: str) -> ReplicationSupervisor:
        if self.replica is None:
            raise CommandRefused(f"{self.m.name} has no replicated_dirs: nothing to {what}")
        if not self.state.is_primary:
            raise CommandRefused(
                f"{what} runs on the primary of {self.m.name}; this node is {self.state.name}"
                f" (run it on {self.peer_name})"
            )
        return self.replica

    async def cmd_verify(self) -> dict[str, Any]:
        rep = self._replica_primary("verify")
        try:
            dirs = await rep.verify()
        except ReplicationError as exc:
            raise CommandRefused(f"verify {self.m.name}: {exc}") from exc
        equal = all(d["equal"] for d in dirs)
        self.events.append(
            self.m.name,
            "verify",
            node=self.node,
            equal=equal,
            differences=sum(len(d["differences"]) for d in dirs),
        )
        files = sum(int(d["files"]) for d in dirs)
        msg = f"{self.m.name}: {files} files compared with {self.peer_name}: " + (
            "identical" if equal else "DIFFERENT"
        )
        return {"message": msg, "equal": equal, "dirs": dirs}

    async def cmd_resync(self, full: bool = False) -> str:
        rep = self._replica_primary("resync")
        self.events.append(self.m.name, "command", node=self.node, command="resync", full=full)
        try:
            await rep.resync(full)
        except ReplicationError as exc:
            raise CommandRefused(f"resync {self.m.name}: {exc}") from exc
        kind = "full (checksum delta)" if full else "incremental"
        return f"{self.m.name}: {kind} resync of {self.peer_name} requested"


def _state_name(p: PeerView) -> str:
    if not p.alive:
        return "LOST" if p.status is PeerStatus.LOST else "UNKNOWN"
    return p.state.name if p.state is not None else "UNKNOWN"


def _hex(g: Generation) -> str:
    return f"{g.current:016x}"


def _sync_word(state: State, rel: Relation, replicated: bool) -> str | None:
    if state is not State.SECOND:
        return None
    if rel is Relation.SAME:
        return "in-sync"
    return "resyncing" if replicated else None


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
