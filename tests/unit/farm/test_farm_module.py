"""FarmModule without root: a fake engine, heartbeats recorded by hand, trio's clock.

What is checked: the first membership report waits for the peers (or one timeout), peers
count only when alive and UP+ELIGIBLE, a failing checker makes the node unhealthy, drain is
refused when nobody else serves and persisted otherwise, mirror-only commands are refused,
and stop removes the engine before stop_both.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from ha_runtime.config import (
    ClusterConfig,
    ModuleConfig,
    ScriptsSpec,
)
from ha_runtime.events import EventLog
from ha_runtime.farm import Membership, Transition
from ha_runtime.farm.module import FarmModule
from ha_runtime.heartbeat.packet import Heartbeat
from ha_runtime.heartbeat.peers import ModuleStream, PeerTable
from ha_runtime.module import CommandRefused
from ha_runtime.states import Flag, State
from tests.sitefactory import module_data, parsed_configs


class FakeMember:
    def __init__(self) -> None:
        self.reason = "not started"
        self.my_buckets: frozenset[int] = frozenset()


class FakeService:
    """The FarmService contract, minus nftables: UP when healthy, not drained, reported."""

    instances: ClassVar[list[FakeService]] = []

    def __init__(self, spec: Any, node: str) -> None:
        self.spec, self.node = spec, node
        self.member = FakeMember()
        self.transitions: collections.deque[Transition] = collections.deque()
        self.state = State.STOP
        self.drained = False
        self.memberships: list[Membership] = []
        self.synced = True
        FakeService.instances.append(self)

    @property
    def announcement(self) -> tuple[State, Flag]:
        return self.state, Flag.ELIGIBLE if self.state is State.UP else Flag.NONE

    def _set(self, state: State, reason: str) -> None:
        if state is not self.state:
            self.transitions.append(Transition(self.state, state, reason))
        self.state, self.member.reason = state, reason

    def _evaluate(self) -> None:
        m = self.memberships[-1] if self.memberships else None
        if m is None:
            self._set(State.WAIT, "waiting for the first membership report")
        elif self.drained:
            self._set(State.WAIT, "drained by the operator")
        elif not m.healthy:
            self._set(State.WAIT, f"checker failing: {m.health_reason}")
        else:
            self._set(State.UP, "serving")

    def drain(self) -> None:
        self.drained = True
        self._evaluate()

    def undrain(self) -> None:
        self.drained = False
        self._evaluate()

    async def refresh(self) -> None:
        return None

    def status(self) -> Any:
        class S:
            def as_dict(_self) -> dict[str, Any]:
                return {"state": self.state.name, "my_buckets": 0, "members": []}

        return S()

    async def run(
        self,
        updates: trio.MemoryReceiveChannel[Membership],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._evaluate()
        task_status.started()
        try:
            async with updates:
                async for m in updates:
                    self.memberships.append(m)
                    self._evaluate()
        finally:
            self._set(State.STOP, "module stopped")


def _configs(
    tmp: Path, checkers: list[dict[str, Any]] | None = None
) -> tuple[ClusterConfig, ModuleConfig]:
    farm = {"power": {"node1": 3, "node2": 1}, "rules": [{"protocol": "tcp", "ports": [8080]}]}
    extra = {"checkers": checkers} if checkers else {}
    cluster, module = parsed_configs(
        tmp, module_data("weather", "farm", vip="10.77.0.200/24", farm=farm, **extra)
    )
    # No script runs: a real subprocess would let the mock clock jump while it waits.
    return cluster, dataclasses.replace(module, scripts=ScriptsSpec())


def _hb(state: State, flags: Flag, seq: int) -> Heartbeat:
    return Heartbeat("node2", "weather", "lan", state, flags, 1, seq, 1)


def _manager(
    tmp: Path, checkers: list[dict[str, Any]] | None = None
) -> tuple[FarmModule, PeerTable]:
    cluster, module = _configs(tmp, checkers)
    stream = ModuleStream("weather", ("node2",), 0.1, 1.0)
    table = PeerTable({"weather": stream}, trio.current_time)

    async def send_now(_m: str) -> None:
        return None

    mgr = FarmModule(
        cluster=cluster,
        module=module,
        peers=table,
        events=EventLog(tmp / "events.jsonl"),
        send_now=send_now,
        service_factory=FakeService,
        clock=trio.current_time,
    )
    return mgr, table


def _run(test: Any) -> None:
    FakeService.instances.clear()
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def test_first_report_waits_one_timeout_then_serves_alone(tmp_path: Path) -> None:
    async def main() -> None:
        mgr, _table = _manager(tmp_path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mgr.run)
            await trio.sleep(0.5)
            svc = FakeService.instances[0]
            assert svc.memberships == [] and mgr.state is State.WAIT
            await trio.sleep(1.0)
            assert svc.memberships and not svc.memberships[-1].peers[0].alive
            assert mgr.state is State.UP
            a = mgr.announce()
            assert (a.state, a.flags, a.generation.current) == (State.UP, Flag.ELIGIBLE, 3)
            nursery.cancel_scope.cancel()

    _run(main)


def test_settled_once_the_first_membership_is_applied(tmp_path: Path) -> None:
    """What the daemon's READY=1 waits for: not the WAIT before the first report."""

    async def main() -> None:
        mgr, _table = _manager(tmp_path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mgr.run)
            await trio.sleep(0.5)
            assert mgr.state is State.WAIT and not mgr.settled
            await trio.sleep(1.0)
            assert mgr.state is State.UP and mgr.settled
            nursery.cancel_scope.cancel()

    _run(main)


def test_peer_heard_reports_at_once_and_counts_only_when_up(tmp_path: Path) -> None:
    async def main() -> None:
        mgr, table = _manager(tmp_path)
        table.record(_hb(State.WAIT, Flag.NONE, 1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mgr.run)
            await trio.sleep(0.15)
            svc = FakeService.instances[0]
            assert svc.memberships, "every peer heard: no need to wait a timeout"
            peer = svc.memberships[-1].peers[0]
            assert peer.alive and not peer.eligible
            table.record(_hb(State.UP, Flag.ELIGIBLE, 2))
            await trio.sleep(0.15)
            peer = svc.memberships[-1].peers[0]
            assert peer.alive and peer.eligible
            await trio.sleep(2.0)  # silent for longer than the timeout
            assert not svc.memberships[-1].peers[0].alive
            nursery.cancel_scope.cancel()

    _run(main)


def test_drain_refused_alone_then_persisted(tmp_path: Path) -> None:
    async def main() -> None:
        mgr, table = _manager(tmp_path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mgr.run)
            await trio.sleep(1.5)
            assert mgr.state is State.UP
            with pytest.raises(CommandRefused, match="no other node serves"):
                await mgr.cmd_drain()
            for seq in range(3, 20):
                table.record(_hb(State.UP, Flag.ELIGIBLE, seq))
                await trio.sleep(0.1)
                if seq == 5:
                    message = await mgr.cmd_drain()
                    assert "drained" in message
            assert mgr.state is State.WAIT and mgr.drain_file.exists()
            assert "already drained" in await mgr.cmd_drain()
            await mgr.cmd_undrain()
            await trio.sleep(0.2)
            assert mgr.state is State.UP and not mgr.drain_file.exists()
            nursery.cancel_scope.cancel()

    _run(main)


def test_mirror_commands_refused_and_stop(tmp_path: Path) -> None:
    async def main() -> None:
        mgr, _table = _manager(tmp_path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mgr.run)
            await trio.sleep(1.5)
            for cmd in (mgr.cmd_swap, mgr.cmd_prim, mgr.cmd_second):
                with pytest.raises(CommandRefused, match="farm module"):
                    await cmd()
            await mgr.cmd_stop()
            assert mgr.state is State.STOP and mgr.service is None and mgr.admin_file.exists()
            assert mgr.status()["farm"]["state"] == "STOP"
            await mgr.cmd_start()
            await trio.sleep(1.5)
            assert mgr.state is State.UP and len(FakeService.instances) == 2
            nursery.cancel_scope.cancel()

    _run(main)


def test_failing_wait_checker_gives_buckets_away(tmp_path: Path) -> None:
    checker = {"name": "http", "type": "tcp", "port": 1, "interval_s": 0.1, "action": "wait"}

    async def main() -> None:
        mgr, _table = _manager(tmp_path, [checker])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mgr.run)
            await trio.sleep(0.2)
            spec = mgr.m.checkers[0]
            await mgr._checker_failed(spec, "connection refused")
            await trio.sleep(1.5)
            svc = FakeService.instances[0]
            assert not svc.memberships[-1].healthy
            assert mgr.state is State.WAIT and "http" in (mgr.status()["blocked"] or "")
            nursery.cancel_scope.cancel()

    _run(main)
