"""`hactl wait`: one process asks the daemon until the module is in a wanted state.

The policy (`status_wait.wait_for_state`) on a fake clock, then the command end to end
against a real API socket served by `api.serve` (the daemon's own server) in a thread.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ha_runtime import api, cli
from ha_runtime.status_wait import Refused, matches, wait_for_state


def _status(state: str, sync: str | None = None) -> dict[str, Any]:
    return {"node": "node2", "modules": [{"name": "flightdata", "state": state, "sync": sync}]}


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s
        self.sleeps += 1


def test_it_returns_when_the_state_is_reached_and_counts_no_more() -> None:
    answers = iter([_status("SECOND"), _status("WAIT"), _status("PRIM"), _status("SECOND")])
    t = FakeTime()
    res = wait_for_state(
        lambda: next(answers), "flightdata", ["PRIM"], clock=t.clock, sleep=t.sleep
    )
    assert res.reached and res.status == _status("PRIM") and t.sleeps == 2


def test_an_unreachable_daemon_is_asked_again_until_the_timeout() -> None:
    t = FakeTime()

    def ask() -> dict[str, Any]:
        raise FileNotFoundError("/run/hapair/api.sock")

    res = wait_for_state(ask, "flightdata", ["PRIM"], timeout=2.0, clock=t.clock, sleep=t.sleep)
    assert not res.reached and res.status is None and "api.sock" in (res.error or "")
    assert 19 <= t.sleeps <= 21  # every 0.1 s for 2 s, not one try


def test_a_restarting_daemon_then_the_state() -> None:
    calls = itertools.count()

    def ask() -> dict[str, Any]:
        if next(calls) < 3:
            raise ConnectionRefusedError("restarting")
        return _status("SECOND", "in-sync")

    t = FakeTime()
    res = wait_for_state(
        ask, "flightdata", ["SECOND"], sync="in-sync", clock=t.clock, sleep=t.sleep
    )
    assert res.reached and res.error is None


def test_a_refusal_ends_the_wait_at_once() -> None:
    t = FakeTime()

    def ask() -> dict[str, Any]:
        raise Refused("unknown module 'flightdat' on node2 (known: flightdata, weather)")

    res = wait_for_state(ask, "flightdat", ["PRIM"], clock=t.clock, sleep=t.sleep)
    assert not res.reached and res.refused and t.sleeps == 0 and "known:" in (res.error or "")


def test_the_sync_sub_state_applies_to_a_second_only() -> None:
    assert not matches({"state": "SECOND", "sync": "resyncing"}, ["SECOND"], "in-sync")
    assert matches({"state": "SECOND", "sync": "In-Sync"}, ["SECOND"], "in-sync")
    assert matches({"state": "PRIM"}, ["PRIM", "SECOND"], "in-sync")
    assert not matches(None, ["PRIM"], None)


@pytest.fixture
def daemon_api(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A real API socket answering `status` from a script of states (the last one repeats)."""
    sock = tmp_path / "api.sock"
    script = ["WAIT", "WAIT", "ALONE", "PRIM"]
    seen: list[str] = []
    stop = threading.Event()

    async def handler(request: dict[str, Any]) -> Any:
        assert request["command"] == "status"
        if request["module"] != "flightdata":  # as the daemon refuses it
            raise api.ApiError(f"unknown module {request['module']!r} on node2")
        state = script[min(len(seen), len(script) - 1)]
        seen.append(state)
        return _status(state)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(api.serve, sock, handler)
            while not stop.is_set():
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    while not sock.exists():
        threading.Event().wait(0.01)
    yield sock, seen
    stop.set()
    thread.join(timeout=5)


def test_hactl_wait_end_to_end(
    daemon_api: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sock, seen = daemon_api
    rc = cli.main(["--socket", str(sock), "wait", "flightdata", "prim", "alone", "--timeout", "5"])
    assert rc == cli.EXIT_OK
    assert seen == ["WAIT", "WAIT", "ALONE"]  # ALONE is one of the states asked for
    assert capsys.readouterr().out.strip() == "flightdata: ALONE"


def test_hactl_wait_times_out_with_the_last_state(
    daemon_api: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sock, _ = daemon_api
    argv = ["--socket", str(sock), "wait", "flightdata", "SECOND", "--timeout", "0.5", "--json"]
    assert cli.main(argv) == cli.EXIT_REFUSED
    out = capsys.readouterr()
    assert '"state": "PRIM"' in out.out
    assert "flightdata is PRIM, not SECOND, after 0.5 s" in out.err


def test_hactl_wait_stops_at_a_refusal(
    daemon_api: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sock, seen = daemon_api
    argv = ["--socket", str(sock), "wait", "flightdat", "PRIM", "--timeout", "30"]
    assert cli.main(argv) == cli.EXIT_REFUSED  # at once, not after 30 s
    assert seen == []
    assert "unknown module 'flightdat' on node2" in capsys.readouterr().err


def test_hactl_wait_never_reached_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--socket",
        str(tmp_path / "none.sock"),
        "wait",
        "flightdata",
        "PRIM",
        "--timeout",
        "0.3",
    ]
    assert cli.main(argv) == cli.EXIT_UNREACHABLE
    assert "not PRIM, after 0.3 s; the daemon on" in capsys.readouterr().err


def test_hactl_wait_refuses_an_unknown_state() -> None:
    with pytest.raises(SystemExit):
        cli.main(["wait", "flightdata", "PRIMARY"])
