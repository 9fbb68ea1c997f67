"""A farm module on this node: scripts, checkers, operator commands and the membership feed.

The farm engine (`service.FarmService`) installs the VIP, the virtual MAC, the
nftables buckets and the ARP responder; this module decides *when* it runs and feeds it:

- start: `prestart`, `start_both`, then the service (WAIT until the first membership
  report, so a restarting node never grabs buckets before it has heard its peers);
  stop: the service first (buckets, VIP, MAC removed), then `stop_both`, `poststop`;
- membership: from the daemon's authenticated heartbeats (`PeerTable`): a peer counts when
  it is alive and announces UP with `Flag.ELIGIBLE`. The first report goes out once every
  peer has been heard or one heartbeat timeout after the start, whichever comes first;
  after that one on every change of a peer, of this node's health or of the witness;
- checkers: the application runs on every node, so app-level checkers run whenever the
  module is started. `wait` and `failover` give the buckets away until the checker passes
  (a farm has no primary to fail over); `restart` runs `stop_both`/`start_both` locally
  within the restart policy, then behaves as `wait`;
- drain/undrain (operator, `drain.yml`): every bucket given away / taken back. A drain is
  persisted in `state_dir/<module>.drained`, so a node rebooted during maintenance stays
  drained until the operator undrains it; a stop in `state_dir/<module>.stopped`.

What this node announces for the module: its farm state with `Flag.ELIGIBLE` when UP, and
its configured power in the generation field (farm modules have no data generation), so
a peer can report a power that differs from its own module file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ha_runtime.config import ClusterConfig, FarmSettings, ModuleConfig
from ha_runtime.events import EventLog
from ha_runtime.farm.member import Membership, PeerView
from ha_runtime.farm.service import FarmService
from ha_runtime.farm.spec import FarmSpec
from ha_runtime.generation import Generation
from ha_runtime.heartbeat.peers import LocalAnnounce, PeerStatus, PeerTable
from ha_runtime.module import CommandRefused, ModuleBase
from ha_runtime.states import Flag, State

log = logging.getLogger(__name__)

ServiceFactory = Callable[[FarmSpec, str], FarmService]


def _real_service(spec: FarmSpec, node: str) -> FarmService:
    return FarmService(spec, node)


class FarmModule(ModuleBase):
    """A farm module: the application and the farm service run on every started node."""

    KIND = "farm"

    STOP_SCRIPT = "stop_both"
    START_SCRIPT = "start_both"
    NOT_RUNNING_DETAIL = "module stopped here"

    def __init__(
        self,
        *,
        cluster: ClusterConfig,
        module: ModuleConfig,
        peers: PeerTable,
        events: EventLog,
        send_now: Callable[[str], Awaitable[None]],
        on_transition: Callable[[str, State, State], None] | None = None,
        service_factory: ServiceFactory = _real_service,
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
        self.spec = FarmSpec.from_module(module, module.farm or FarmSettings())
        self.peer_names = tuple(n for n in module.nodes if n != cluster.node)
        self._factory = service_factory
        self.drain_file = cluster.state_dir / f"{module.name}.drained"
        self.drained = self.drain_file.exists()
        self.service: FarmService | None = None
        self._membership_tx: trio.MemorySendChannel[Membership] | None = None
        self._service_done: trio.Event | None = None
        self._started_at = 0.0
        self._sent: Membership | None = None

    # ----------------------------------------------------------------- heartbeats

    @property
    def power(self) -> int:
        return self.spec.power_map.get(self.node, 1)

    def announce(self) -> LocalAnnounce:
        state, flags = self.service.announcement if self.service else (State.STOP, Flag.NONE)
        return LocalAnnounce(state, flags, Generation(self.power))

    def peer_views(self) -> tuple[PeerView, ...]:
        out = []
        for name in self.peer_names:
            v = self.peers.view(self.m.name, name)
            eligible = v.alive and v.state is State.UP and Flag.ELIGIBLE in v.flags
            power = v.generation.current if v.status is not PeerStatus.NEVER else None
            out.append(PeerView(name, v.alive, eligible, power or None))
        return tuple(out)

    def membership(self) -> Membership:
        return Membership(
            peers=self.peer_views(),
            healthy=not self.blocked,
            health_reason=self.blocked_reason() or "",
            witness_ok=self.witness_ok,
            isolated=self.isolated,
        )

    def _all_peers_heard(self) -> bool:
        return all(
            self.peers.view(self.m.name, n).status is PeerStatus.ALIVE for n in self.peer_names
        )

    # ----------------------------------------------------------------- ModuleBase hooks

    def _app_running(self) -> bool:
        return self.service is not None

    def _module_started(self) -> bool:
        return self.service is not None

    def _peer_names(self) -> tuple[str, ...]:
        return tuple(self.peer_names)

    def _script_peer(self) -> str:
        return ",".join(self.peer_names)

    def _generation_label(self) -> str:
        return "farm"

    async def _withdraw(self, checker: str, detail: str) -> None:
        # A farm has no primary to fail over to: give the buckets away until it passes.
        self._block(checker, detail)

    def _checker_passed(self, checker: str) -> None:
        self._checker_event(checker, "pass")
        super()._checker_passed(checker)

    async def _restart_module(self) -> str:
        return await self.cmd_start()  # nothing runs here: starting is the restart

    # ----------------------------------------------------------------- main loop

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._start_monitors(nursery)
            while True:
                await self.step(nursery)
                # Settled: stopped by the operator, or the first membership was applied.
                self.settled = self.settled or self.admin_stopped or self._sent is not None
                await self._wait_for_news()

    async def step(self, nursery: trio.Nursery) -> None:
        async with self._lock:
            if not self.admin_stopped and self.service is None:
                await self._start(nursery)
            elif self.admin_stopped and self.service is not None:
                await self._stop("stopped by the operator")
            await self._feed()
        await self._follow_service()

    async def _feed(self) -> None:
        if self.service is None or self._membership_tx is None:
            return
        if self._sent is None and not (
            self._all_peers_heard()
            or self._clock() - self._started_at >= self.m.heartbeat.timeout_ms / 1000
        ):
            return  # too early: the peers may be alive and not heard yet
        m = self.membership()
        if m != self._sent:
            self._sent = m
            await self._membership_tx.send(m)
            await trio.sleep(0)  # let the service apply it before we read its state

    async def _follow_service(self) -> None:
        """Record the engine's transitions (events, metrics) and announce them at once."""
        service = self.service
        new_state = service.state if service is not None else State.STOP
        if service is not None:
            while service.transitions:
                t = service.transitions.popleft()
                self.reason = t.reason
                self._transition_event(t.old, t.new, t.reason, [])
        if new_state is not self.state:
            old, self.state = self.state, new_state
            self.last_transition = time.time()
            if self._on_transition is not None:
                self._on_transition(self.m.name, old, new_state)
            await self._send_now(self.m.name)
        elif service is not None:
            self.reason = service.member.reason

    async def _start(self, nursery: trio.Nursery) -> None:
        await self._run_script("prestart", "STOP->WAIT", "module starting")
        res = await self._run_script("start_both", "STOP->WAIT", "module starting")
        if res is not None and not res.ok:
            # The service still starts: the checkers keep the node out of the buckets
            # while the application does not answer.
            self.events.append(
                self.m.name, "script", node=self.node, script="start_both", error=res.describe()
            )
        service = self._factory(self.spec, self.node)
        if self.drained:
            service.drain()
        tx, rx = trio.open_memory_channel[Membership](16)
        done = trio.Event()
        self._sent = None
        self._started_at = self._clock()
        for c in self.checks.values():
            c.failures = 0
        try:
            await nursery.start(self._run_service, service, rx, done)
        except RuntimeError:  # it failed before it was installed (logged by _run_service)
            await self._run_script("stop_both", "WAIT->STOP", "farm service failed to start")
            return
        self.service, self._membership_tx, self._service_done = service, tx, done

    async def _run_service(
        self,
        service: FarmService,
        rx: trio.MemoryReceiveChannel[Membership],
        done: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await service.run(rx, task_status=task_status)
        except Exception:
            log.exception("farm %s: the service failed", self.m.name)
            self.events.append(self.m.name, "error", node=self.node, detail="farm service failed")
            self.admin_stopped = True  # not restarted in a loop; `hactl start` retries
            self.wake()
        finally:
            done.set()
            self.wake()

    async def _stop(self, reason: str) -> None:
        service, tx, done = self.service, self._membership_tx, self._service_done
        if service is None:
            return
        if tx is not None:
            await tx.aclose()  # the service removes everything it installed, then returns
        if done is not None:
            await done.wait()
        await self._follow_service()  # its last transitions, before it goes
        self.service, self._membership_tx, self._service_done = None, None, None
        await self._follow_service()
        label = "->STOP"
        await self._run_script("stop_both", label, reason)
        await self._run_script("poststop", label, reason)
        self.reason = reason

    async def shutdown(self) -> None:
        """Daemon stopping: remove the buckets and VIP, stop the application, tell peers."""
        async with self._lock:
            await self._stop("hapair daemon stopping")

    # ----------------------------------------------------------------- operator commands

    async def cmd_drain(self) -> str:
        if self.drained:
            return f"{self.m.name} is already drained on {self.node}"
        others = [p.name for p in self.peer_views() if p.alive and p.eligible]
        if self.service is not None and self.state is State.UP and not others:
            raise CommandRefused(
                f"drain {self.m.name} refused: no other node serves the farm now "
                f"({', '.join(self.peer_names)} not UP); draining would leave the VIP "
                "unanswered. Nothing changed."
            )
        self.drained = True
        self.drain_file.parent.mkdir(parents=True, exist_ok=True)
        self.drain_file.touch()
        self.events.append(self.m.name, "command", node=self.node, command="drain")
        if self.service is not None:
            self.service.drain()
        self.wake()
        await self._await_state(self._applied, self._transition_timeout())
        return (
            f"{self.m.name} drained on {self.node}: no bucket here; new connections go to "
            f"{', '.join(others) or 'the other nodes'}, established ones finish here"
        )

    async def cmd_undrain(self) -> str:
        if not self.drained:
            return f"{self.m.name} is not drained on {self.node}"
        self.drained = False
        self.drain_file.unlink(missing_ok=True)
        self.events.append(self.m.name, "command", node=self.node, command="undrain")
        if self.service is not None:
            self.service.undrain()
        self.wake()
        await self._await_state(self._applied, self._transition_timeout())
        n = len(self.service.member.my_buckets) if self.service is not None else 0
        return f"{self.m.name} undrained on {self.node}: {self.state.name}, {n} buckets here"

    def _applied(self) -> bool:
        s = self.service
        return s is None or (s.synced and s.state is self.state)

    async def _refused(self, cmd: str) -> str:
        raise CommandRefused(
            f"{cmd} {self.m.name} refused: {self.m.name} is a farm module (active on every node, "
            "no primary). To take a node out for maintenance: `hactl drain "
            f"{self.m.name}` on it (playbooks/drain.yml), then `hactl undrain {self.m.name}`."
        )

    async def cmd_prim(self) -> str:
        return await self._refused("prim")

    async def cmd_second(self) -> str:
        return await self._refused("second")

    async def cmd_swap(self) -> str:
        return await self._refused("swap")

    async def cmd_verify(self) -> dict[str, Any]:
        raise CommandRefused(f"verify {self.m.name} refused: farm modules replicate nothing")

    async def cmd_resync(self, full: bool = False) -> str:
        raise CommandRefused(f"resync {self.m.name} refused: farm modules replicate nothing")

    # ----------------------------------------------------------------- status

    async def refresh(self) -> None:
        if self.service is not None:
            await self.service.refresh()

    @property
    def peer_alive(self) -> bool:
        return any(p.alive for p in self.peer_views())

    def _kind_status(self) -> dict[str, Any]:
        views = {n: self.peers.view(self.m.name, n) for n in self.peer_names}
        mine = self.service.status().as_dict() if self.service is not None else None
        peer_states = {
            n: (v.state.name if v.alive and v.state is not None else _gone(v.status))
            for n, v in views.items()
        }
        return {
            "peer": ",".join(self.peer_names),
            "peer_state": ",".join(f"{n}={s}" for n, s in peer_states.items()),
            "peer_alive": any(v.alive for v in views.values()),
            "peer_networks": {n: self.peers.networks_alive(self.m.name, n) for n in views},
            "vip_held": self.service is not None,
            "sync": None,
            "eligible": self.state is State.UP,
            "drained": self.drained,
            "farm": mine if mine is not None else self._stopped_farm_status(peer_states),
        }

    def _stopped_farm_status(self, peer_states: dict[str, str]) -> dict[str, Any]:
        members = [
            {
                "node": n,
                "power": p,
                "alive": n != self.node and peer_states.get(n) not in ("LOST", "UNKNOWN"),
                "eligible": peer_states.get(n) == "UP",
                "buckets": None,
            }
            for n, p in self.spec.powers
        ]
        return {
            "module": self.m.name,
            "node": self.node,
            "state": "STOP",
            "reason": self.reason,
            "drained": self.drained,
            "vip": self.spec.vip,
            "mac": self.spec.mac,
            "mac_mode": self.spec.mac_mode,
            "members": members,
            "my_buckets": 0,
            "connections_served": 0,
            "foreign_packets": 0,
            "arp_requests": 0,
            "arp_replies": 0,
        }


def _gone(status: PeerStatus) -> str:
    return "LOST" if status is PeerStatus.LOST else "UNKNOWN"
