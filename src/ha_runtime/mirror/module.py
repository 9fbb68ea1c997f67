"""A mirror module on this node: how it answers its replication children and the operator.

The decision loop and its effects are `transitions.MirrorTransitions`. Here: what the
replication children report (a dead primary child, events, a fence request before an
fsync is acknowledged alone), the operator's commands (prim, second, swap, verify,
resync; drain and undrain are refused: farm only), and the mirror's status.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import trio

from ha_runtime.generation import Relation
from ha_runtime.heartbeat.peers import PeerStatus, PeerView
from ha_runtime.mirror.decision import peer_ready, swap_refusal
from ha_runtime.mirror.supervisor import ReplicationError, ReplicationSupervisor
from ha_runtime.mirror.transitions import MirrorTransitions, hex_generation
from ha_runtime.module import CommandRefused
from ha_runtime.states import State

log = logging.getLogger(__name__)


class MirrorModule(MirrorTransitions):
    """A mirror module: one primary with the VIP and the application, one SECOND."""

    KIND = "mirror"

    # ----------------------------------------------------------------- the replication children

    async def _replication_follow(self, new: State) -> None:
        """A SECOND receives into its backing directories; other non-primary states don't
        (the primary's children are started and stopped by _promote/_demote)."""
        if self.replication is None or new.is_primary:
            return
        if new is State.SECOND:
            try:
                await self.replication.start("secondary")
            except ReplicationError as exc:
                log.error("%s: cannot receive replication: %s", self.m.name, exc)  # noqa: TRY400
                self.events.append(
                    self.m.name, "replication", node=self.node, kind="error", reason=str(exc)
                )
        elif self.replication.role is not None:
            await self.replication.stop()

    def _check_replication(self) -> None:
        if self.replication is None or self.ctl.yielding is not None or self._recovering:
            return
        failed = self.replication.failed_primary()
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
        assert self.replication is not None
        try:
            async with self._lock:
                if not self.state.is_primary:
                    return
                label = f"{self.state.name}->{self.state.name}"
                await self._run_script("stop_prim", label, why)
                await self.replication.stop()
                try:
                    await self.replication.start("primary")
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

    def _on_replication_event(self, index: int, kind: str, detail: dict[str, Any]) -> None:
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
                    declared == hex_generation(self.record.generation)
                    or not self.record.peer_outdated
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
        assert self.replication is not None
        log.info(
            "%s: peer fenced off its old copy for %s after %.2f s (generation %s)",
            self.m.name, self.m.replicated_dirs[index], self._clock() - fence_start,
            self.record.generation.short(),
        )  # fmt: skip
        await self.replication.fenced(index, token)

    def _fence_holds_role(self) -> bool:
        return (
            self.state.is_primary
            and self.replication is not None
            and self.replication.role == "primary"
        )

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

    async def cmd_drain(self) -> str:
        return self._farm_only("drain")

    async def cmd_undrain(self) -> str:
        return self._farm_only("undrain")

    def _farm_only(self, cmd: str) -> str:
        raise CommandRefused(
            f"{cmd} {self.m.name} refused: {self.m.name} is a mirror module; drain and undrain"
            f" are for farm modules (use `hactl swap {self.m.name}` to move a mirror module)"
        )

    # ----------------------------------------------------------------- status

    @property
    def peer_alive(self) -> bool:
        return self.peer_view().alive

    def heartbeat_networks(self) -> list[str]:
        return self.peers.networks_alive(self.m.name, self.peer_name)

    def _kind_status(self) -> dict[str, Any]:
        p = self.peer_view()
        i = self.inputs()
        heard = p.status is not PeerStatus.NEVER
        return {
            "peer": self.peer_name,
            "peer_state": _state_name(p) if heard else "UNKNOWN",
            "peer_alive": p.alive,
            "peer_networks": self.heartbeat_networks(),
            "vip_held": self.state.is_primary,
            "sync": _sync_word(self.state, i.relation, self.replication is not None),
            "eligible": i.eligible,
            "generation": self.record.generation.short(),
            "peer_generation": p.generation.short() if heard else None,
            "data": i.relation.value if heard else "unknown",
            "yielding": i.yielding,
            "replication": self.replication.status(hex_generation(p.generation))
            if self.replication is not None
            else None,
        }

    def replication_metrics(self) -> tuple[dict[str, Any], dict[int, dict[str, Any]]] | None:
        if self.replication is None:
            return None
        # The module's own summary (a secondary is in sync at the primary's generation).
        summary: dict[str, Any] = self.status()["replication"]
        return summary, {i: dict(ch.status) for i, ch in self.replication.children.items()}

    def refusal(self, action: str) -> str | None:
        if action == "swap":
            return swap_refusal(self.inputs())
        if action == "resync" and self.replication is None:
            return f"{self.m.name} has no replicated_dirs: nothing to resync"
        if action == "resync" and not self.state.is_primary:
            return f"resync runs on the primary; this node is {self.state.name}"
        return None

    # ----------------------------------------------------------------- replication commands

    def _replication_primary(self, what: str) -> ReplicationSupervisor:
        if self.replication is None:
            raise CommandRefused(f"{self.m.name} has no replicated_dirs: nothing to {what}")
        if not self.state.is_primary:
            raise CommandRefused(
                f"{what} runs on the primary of {self.m.name}; this node is {self.state.name}"
                f" (run it on {self.peer_name})"
            )
        return self.replication

    async def cmd_verify(self) -> dict[str, Any]:
        rep = self._replication_primary("verify")
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
        rep = self._replication_primary("resync")
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


def _sync_word(state: State, rel: Relation, replicated: bool) -> str | None:
    if state is not State.SECOND:
        return None
    if rel is Relation.SAME:
        return "in-sync"
    return "resyncing" if replicated else None
