"""The checker policy both module types share (ha_runtime.module), on each of them.

What is checked: a `restart` checker restarts the application within the restart budget
and then gives up the way its module type does (a mirror fails over, a farm gives its
buckets away); the budget frees up as restarts leave the window; a `wait` checker blocks
once; a blocked farm checker does not spend restarts; the admin-stopped file survives a
restart of the daemon; `hactl start` clears a mirror's failover verdict.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ha_runtime import checkers
from ha_runtime.config import (
    ClusterConfig,
    ModuleConfig,
    ScriptsSpec,
)
from ha_runtime.events import EventLog
from ha_runtime.farm.module import FarmModule
from ha_runtime.heartbeat.packet import Heartbeat
from ha_runtime.heartbeat.peers import ModuleStream, PeerTable
from ha_runtime.isolation import WitnessProbe
from ha_runtime.mirror.decision import decide
from ha_runtime.mirror.module import MirrorModule
from ha_runtime.states import Flag, State
from tests.sitefactory import module_data, parsed_configs

CHECKER = {"name": "app", "type": "tcp", "port": 1, "interval_s": 1, "action": "restart"}
WAITER = {"name": "disk", "type": "tcp", "port": 2, "interval_s": 1, "action": "wait"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _configs(tmp: Path, kind: str) -> tuple[ClusterConfig, ModuleConfig]:
    extra = {"farm": {"rules": [{"protocol": "tcp", "ports": [8080]}]}} if kind == "farm" else {}
    module = module_data(
        "app", kind, vip="10.77.0.200/24", checkers=[CHECKER, WAITER],
        restart_policy={"max_restarts": 2, "window_s": 100}, **extra,
    )  # fmt: skip
    cluster, parsed = parsed_configs(tmp, module)
    # No script runs: what is checked is the policy, not the subprocess.
    return cluster, dataclasses.replace(parsed, scripts=ScriptsSpec())


async def _send_now(_m: str) -> None:
    return None


def _mirror(tmp: Path, clock: Clock) -> MirrorModule:
    cluster, module = _configs(tmp, "mirror")
    table = PeerTable({"app": ModuleStream("app", ("node2",), 0.1, 1.0)}, clock)
    return MirrorModule(
        cluster=cluster,
        module=module,
        peers=table,
        events=EventLog(tmp / "events.jsonl"),
        send_now=_send_now,
        clock=clock,
    )


def _farm(tmp: Path, clock: Clock) -> FarmModule:
    cluster, module = _configs(tmp, "farm")
    table = PeerTable({"app": ModuleStream("app", ("node2",), 0.1, 1.0)}, clock)
    return FarmModule(
        cluster=cluster,
        module=module,
        peers=table,
        events=EventLog(tmp / "events.jsonl"),
        send_now=_send_now,
        clock=clock,
    )


def _checker_events(mgr: Any) -> list[tuple[str, str]]:
    return [(e["action"], e["detail"]) for e in mgr.events.read("app") if e["event"] == "checker"]


def _restarts(mgr: Any) -> int:
    return sum(1 for e in mgr.events.read("app") if e["event"] == "restart")


def test_mirror_restarts_within_budget_then_fails_over(tmp_path: Path) -> None:
    clock = Clock()
    mgr = _mirror(tmp_path, clock)
    spec = mgr.m.checkers[0]
    assert spec.action == "restart"

    async def main() -> None:
        mgr.state = State.PRIM  # the application runs here: a restart restarts it
        mgr.checks["app"].failures = 5
        await mgr._checker_failed(spec, "refused")
        clock.now += 10
        await mgr._checker_failed(spec, "refused")
        assert _restarts(mgr) == 2 and mgr.ctl.yielding is None
        assert mgr.checks["app"].failures == 0
        clock.now += 10
        await mgr._checker_failed(spec, "refused")
        assert _restarts(mgr) == 2  # budget spent: no third restart
        why = "checker app: refused (2 restarts used in the window)"
        assert _checker_events(mgr)[-1] == ("failover", why)
        assert mgr.ctl.yielding == why
        assert not mgr.inputs().eligible and mgr.status()["restarts_in_window"] == 2
        # The first restart leaves the window: one restart is allowed again.
        mgr.ctl.yielding = None
        clock.now = 1000.0 + 100
        await mgr._checker_failed(spec, "refused")
        assert _restarts(mgr) == 3 and mgr.ctl.yielding is None

    trio.run(main)


def test_mirror_wait_checker_blocks_once_and_start_clears_failover(tmp_path: Path) -> None:
    clock = Clock()
    mgr = _mirror(tmp_path, clock)
    waiter = mgr.m.checkers[1]

    async def main() -> None:
        await mgr._checker_failed(waiter, "full")
        await mgr._checker_failed(waiter, "full")
        assert _checker_events(mgr) == [("wait", "full")]
        assert mgr.inputs().blocked == "disk: full" and mgr.ctl.yielding is None
        mgr.ctl.yielding = "checker app: refused"
        mgr.state = State.WAIT  # already started: cmd_start returns at once
        await mgr.cmd_start()
        assert mgr.ctl.yielding is None and not mgr.admin_stopped

    trio.run(main)


def test_farm_restarts_within_budget_then_gives_buckets_away(tmp_path: Path) -> None:
    clock = Clock()
    mgr = _farm(tmp_path, clock)
    spec = mgr.m.checkers[0]

    async def main() -> None:
        for _ in range(3):
            await mgr._checker_failed(spec, "refused")
        detail = "refused (2 restarts used in the window)"
        assert [a for a, _ in _checker_events(mgr)] == ["restart", "restart", "wait"]
        assert mgr.blocked == {"app": detail} and not mgr.membership().healthy
        # Blocked: it waits to pass, it does not spend the restarts freed by the window.
        clock.now += 100
        await mgr._checker_failed(spec, "refused")
        assert mgr.budget.used(clock.now) == 0 and len(_checker_events(mgr)) == 3

    trio.run(main)


def test_admin_stop_survives_a_daemon_restart(tmp_path: Path) -> None:
    clock = Clock()
    first = _mirror(tmp_path, clock)
    first.admin_file.parent.mkdir(parents=True)
    first.admin_file.touch()  # what cmd_stop leaves behind
    mirror = _mirror(tmp_path, clock)
    assert mirror.state is State.STOP and mirror.flags == Flag.NONE
    assert mirror.inputs().admin_stopped
    assert _farm(tmp_path, clock).admin_stopped  # same module name: same file


def _heard(table: PeerTable, at_state: State = State.SECOND) -> None:
    table.record(Heartbeat("node2", "app", "hb", at_state, Flag.ELIGIBLE, 1, 1, 1))


def test_an_isolated_primary_releases_well_inside_the_peers_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the fault campaign found: cut from every network, a node kept its VIP (or
    every farm bucket) until its periodic witness probe timed out, up to 2 s after the cut,
    while the peer took over at its 1 s timeout. Now the quiet peer triggers a probe at a
    third of the timeout and the node counts as isolated before the timeout."""
    sent: list[float] = []

    async def unanswered(addresses: tuple[str, ...], timeout_s: float, attempts: int = 1) -> bool:
        sent.append(trio.current_time())
        await trio.sleep(timeout_s)  # a cut witness: the whole window passes
        return False

    monkeypatch.setattr(checkers, "any_reachable", unanswered)
    for make in (_mirror, _farm):
        sent.clear()

        async def main(make: Any = make) -> None:
            mgr = make(tmp_path / make.__name__, trio.current_time)
            mgr.m = dataclasses.replace(mgr.m, witness=("10.77.0.254",))
            mgr.isolation.m = mgr.m  # the watch reads the module's witnesses
            _heard(mgr.peers)
            cut = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(mgr.isolation.watch)
                await trio.sleep(0.3)
                assert not sent and not mgr.isolated  # 0.3 s of silence is not suspicious
                while not mgr.isolated:
                    await trio.sleep(0.01)
                released = trio.current_time() - cut
                # suspicion at 1/3 s + one tick + the 1/6 s window, far from the 1 s timeout
                assert released <= 0.6, released
                assert len(sent) == 1  # one probe per quiet spell, not one per tick
                if isinstance(mgr, MirrorModule):
                    mgr.state = State.PRIM
                    assert mgr.inputs().isolated and decide(mgr.inputs()).state is State.WAIT
                else:
                    assert mgr.membership().isolated
                _heard(mgr.peers)  # the peer is heard again: not isolated any more
                assert not mgr.isolated
                nursery.cancel_scope.cancel()

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_probe_answered_just_before_the_cut_does_not_hold_off_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault campaign (seed 154, again): the periodic probe left after the peer's last
    heartbeat but just before the cut, and the witness answered it. The watch took that as
    the verdict, did not probe again, and the node released its buckets only at the next
    periodic probe, after the peer had taken them over. A probe counts only once the
    silence is suspicious, so the watch probes again and the node releases in time."""
    cut_at: list[float] = []
    sent: list[float] = []

    async def witness(addresses: tuple[str, ...], timeout_s: float, attempts: int = 1) -> bool:
        sent.append(trio.current_time())
        if not cut_at or trio.current_time() < cut_at[0]:
            return True
        await trio.sleep(timeout_s)
        return False

    monkeypatch.setattr(checkers, "any_reachable", witness)

    async def main() -> None:
        mgr = _farm(tmp_path, trio.current_time)
        mgr.m = dataclasses.replace(mgr.m, witness=("10.77.0.254",))
        mgr.isolation.m = mgr.m  # the watch reads the module's witnesses
        mgr.isolation.witness_ok = True  # as a module configured with a witness starts
        _heard(mgr.peers)
        heard = trio.current_time()
        await trio.sleep(0.05)
        await mgr.isolation.probe_witness()  # the periodic probe, answered
        cut_at.append(trio.current_time() + 0.01)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mgr.isolation.watch)
            with trio.move_on_after(1.0):  # the peer's timeout
                while not mgr.isolated:
                    await trio.sleep(0.01)
            assert mgr.isolated and len(sent) == 2
            assert trio.current_time() - heard <= 0.6
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _peer_quiet_with_witness(tmp: Path, clock: Clock) -> MirrorModule:
    """A mirror with a witness whose peer was last heard half a second ago."""
    mgr = _mirror(tmp, clock)
    mgr.m = dataclasses.replace(mgr.m, witness=("10.77.0.254",))
    mgr.isolation.m = mgr.m  # the watch reads the module's witnesses
    _heard(mgr.peers)
    clock.now += 0.5
    return mgr


def test_only_a_probe_sent_after_the_peer_went_quiet_counts(tmp_path: Path) -> None:
    clock = Clock()
    mgr = _peer_quiet_with_witness(tmp_path, clock)
    # Witness unreachable before the silence began (the witness alone was down): no verdict.
    mgr.isolation.probe = WitnessProbe(started=clock.now - 0.6, ok=False)
    assert not mgr.isolated
    mgr.isolation.probe = WitnessProbe(started=clock.now - 0.1, ok=False)
    assert mgr.isolated
    mgr.isolation.probe = WitnessProbe(started=clock.now - 0.1, ok=True)
    assert not mgr.isolated  # the witness answers: the peer is the one gone
    no_witness = _mirror(tmp_path / "plain", clock)
    no_witness.isolation.probe = WitnessProbe(started=clock.now, ok=False)
    assert not no_witness.isolated


def test_a_node_whose_own_cut_heals_waits_for_the_peer_before_taking_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault campaign (seed 154): an isolated node stepped down, then its witness
    answered again a moment before the peer's heartbeats did, and it took over with its old
    data while the peer was primary. Until the peer is heard, or for one heartbeat timeout
    with the witness back, it still counts as isolated and stays out."""
    answers: list[bool] = []

    async def witness(addresses: tuple[str, ...], timeout_s: float, attempts: int = 1) -> bool:
        return answers.pop(0)

    monkeypatch.setattr(checkers, "any_reachable", witness)
    clock = Clock()
    mgr = _peer_quiet_with_witness(tmp_path, clock)

    def probe(ok: bool) -> None:
        answers.append(ok)
        trio.run(mgr.isolation.probe_witness)

    probe(False)  # cut off
    assert mgr.isolated
    mgr.state = State.WAIT
    clock.now += 8.0  # the cut lasts; the peer took over long ago
    probe(True)  # the cut heals: the witness answers before the peer's heartbeats arrive
    assert mgr.isolated
    assert decide(mgr.inputs()).state is State.WAIT
    _heard(mgr.peers)  # its heartbeats arrive: the ordinary rules decide from here
    assert not mgr.isolated
    # Cut off again, healed again, and the peer stays silent for a whole timeout with the
    # witness up: it really is gone, and this node is not isolated any more.
    clock.now += 0.5
    probe(False)
    assert mgr.isolated
    clock.now += 0.5
    probe(True)
    assert mgr.isolated
    clock.now += 1.0  # the module's heartbeat timeout
    assert not mgr.isolated


def _run_checker(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, answers: dict[int, bool], until: float
) -> tuple[MirrorModule, list[float]]:
    """The mirror's `app` checker (1 s period, default grace) run for `until` s of mock time
    after the application's start script returned, each probe answered by `answers` (by
    whole second; failing otherwise); returns the module and when it restarted the app."""
    restarts: list[float] = []

    async def answer(spec: Any) -> tuple[bool, str]:
        return answers.get(round(trio.current_time() - start[0]), False), "refused"

    monkeypatch.setattr(checkers, "probe", answer)
    start: list[float] = []

    async def main() -> MirrorModule:
        mgr = _mirror(tmp, trio.current_time)
        mgr.state = State.PRIM
        real_restart = mgr.restart_application

        async def restart(reason: str) -> None:
            restarts.append(trio.current_time() - start[0])
            await real_restart(reason)

        mgr.restart_application = restart  # type: ignore[method-assign]
        await mgr._run_script("start_prim", "SECOND->PRIM", "test")  # no script: returns at once
        start.append(trio.current_time())
        with trio.move_on_after(until):
            await mgr._checker_loop(mgr.m.checkers[0])
        return mgr

    mgr = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return mgr, restarts


def test_a_starting_application_is_not_restarted_within_its_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upgrade scenario (issue 17): a loaded node took 1.4 s to start flightdata, the
    `http` checker failed twice meanwhile and restarted it, and the start began again: a
    4.6 s gap. Failures do not count for `start_grace_s` (10 s by default) after the start
    script returned; after it, two in a row restart as before."""
    assert _mirror(tmp_path / "cfg", Clock()).m.checkers[0].start_grace_s == 10.0
    mgr, restarts = _run_checker(tmp_path / "a", monkeypatch, {}, until=9.5)
    assert restarts == []
    st = mgr.checks["app"]
    assert (st.ok, st.failures, st.detail) == (False, 0, "refused (the application is starting)")
    _, restarts = _run_checker(tmp_path / "b", monkeypatch, {}, until=12.5)
    assert restarts == [11.0]  # the probes of 10 s and 11 s, the first two after the grace


def test_an_application_that_passed_once_is_judged_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grace ends at the first pass: an application that answered and then died is
    restarted after two failures, as without a grace. A restart begins a grace again."""
    _, restarts = _run_checker(tmp_path, monkeypatch, {3: True}, until=17.5)
    assert restarts == [5.0, 16.0]  # the grace after the restart ends at 15 s


def test_failures_before_the_start_script_returned_do_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A promotion claims the primary state before the replicator, the VIP and the start
    script: the checker probes an application not started yet. A stop begins that again."""
    clock = Clock()
    mgr = _mirror(tmp_path, clock)
    spec = mgr.m.checkers[0]
    assert mgr.grace.holds(spec, clock.now)  # never started in this daemon's life
    mgr.grace.started(clock.now)
    clock.now += 10.0
    assert not mgr.grace.holds(spec, clock.now)
    trio.run(mgr._run_script, "stop_prim", "PRIM->SECOND", "test")
    assert mgr.grace.holds(spec, clock.now + 100)
