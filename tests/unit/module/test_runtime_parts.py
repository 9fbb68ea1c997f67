"""Small runtime pieces: secrets, events, scripts, restart budget, checkers, notify, GARP."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import trio

from ha_runtime.checkers import RestartBudget, interface_up, probe, process_running
from ha_runtime.config import CheckerSpec
from ha_runtime.events import EventLog, RefusalLog
from ha_runtime.generation import Generation, GenerationStore, GenRecord, atomic_write
from ha_runtime.scripts import run_script, script_env
from ha_runtime.sdnotify import notify
from ha_runtime.security import InsecureFile, check_private, read_site_key
from ha_runtime.vip import garp_frame


def test_secret_file_modes(tmp_path: Path) -> None:
    key = tmp_path / "site.key"
    key.write_bytes(b"x" * 40 + b"\n")
    key.chmod(0o644)
    with pytest.raises(InsecureFile, match=r"mode 0644.*chmod 0600"):
        check_private(key, "site key")
    key.chmod(0o600)
    assert read_site_key(key) == b"x" * 40
    key.write_bytes(b"short")
    with pytest.raises(InsecureFile, match="too short"):
        read_site_key(key)
    with pytest.raises(InsecureFile, match="does not exist"):
        check_private(tmp_path / "nope", "TLS key")


def test_events_append_and_filter(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.append("a", "transition", **{"from": "WAIT", "to": "ALONE"}, reason="r1")
    log.append("b", "transition", **{"from": "WAIT", "to": "SECOND"}, reason="r2")
    with (tmp_path / "events.jsonl").open("a") as fh:
        fh.write('{"torn": ')  # a crash mid-line must not break reading
    assert [e["reason"] for e in log.read()] == ["r1", "r2"]
    assert [e["module"] for e in log.read("b")] == ["b"]


def test_generation_store_roundtrip(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, "m")
    assert store.load() == GenRecord()
    rec = GenRecord(Generation().advance().advance(), True)
    store.save(rec)
    assert store.load() == rec
    assert not list(tmp_path.glob(".*tmp"))


def test_atomic_write_from_concurrent_threads(tmp_path: Path) -> None:
    """The fault campaign killed a primary's replication child with FileNotFoundError: two
    threads declared the same `.synced` file through one fixed temp name, and the first
    rename took the second's temp away. Each writer now has its own temp."""
    path = tmp_path / "m.0.synced"
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(200):
                atomic_write(path, f"{n}-{i}\n".encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_text().endswith("-199\n")
    assert not list(tmp_path.glob(".*tmp"))


def test_script_env_and_output(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = tmp_path / "s"
    script.write_text('#!/bin/sh\necho "hello $HAPAIR_MODULE $HAPAIR_TRANSITION"\nexit 3\n')
    script.chmod(0o755)
    env = script_env(
        module="m",
        node="n",
        peer="p",
        script="start_prim",
        transition="WAIT->ALONE",
        reason="r",
        vip="",
    )
    caplog.set_level("INFO")
    res = trio.run(lambda: run_script(script, env, 5, label="m/start_prim"))
    assert res.returncode == 3 and not res.ok
    assert "hello m WAIT->ALONE" in caplog.text


def test_script_timeout_kills_the_group(tmp_path: Path) -> None:
    script = tmp_path / "hang"
    # The child ignores SIGTERM: the forced kill must still end it.
    script.write_text("#!/bin/sh\ntrap '' TERM\nsleep 30 &\nwait\n")
    script.chmod(0o755)
    env = script_env(
        module="m", node="n", peer="p", script="stop_prim", transition="x", reason="r", vip=""
    )
    start = time.monotonic()
    res = trio.run(lambda: run_script(script, env, 0.3, label="m/stop_prim", grace_s=0.3))
    assert res.timed_out and not res.ok
    assert time.monotonic() - start < 5


def test_restart_budget_window() -> None:
    b = RestartBudget(3, 100)
    assert all(b.try_restart(t) for t in (0, 1, 2))
    assert not b.try_restart(50) and b.exhausted(50)
    assert b.try_restart(100.5)  # the first restart left the window


def test_checkers() -> None:
    assert process_running(Path("/proc/self/comm").read_text().strip())
    assert not process_running("no-such-process-hapair")
    assert interface_up("lo")[0]
    assert not interface_up("nonexistent0")[0]
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        spec = CheckerSpec("t", "tcp", 1, 1, "restart", port=port)
        assert trio.run(probe, spec)[0]
    assert not trio.run(probe, CheckerSpec("t", "tcp", 1, 1, "restart", port=port))[0]
    cmd = CheckerSpec("c", "command", 1, 0.5, "wait", command=("/bin/sleep", "5"))
    ok, detail = trio.run(probe, cmd)
    assert not ok and "no answer" in detail


def test_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1")
        assert rx.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")


def test_garp_frame() -> None:
    mac = bytes.fromhex("020000000001")
    f = garp_frame(mac, "10.77.0.100")
    assert len(f) == 42 and f[:6] == b"\xff" * 6 and f[12:14] == b"\x08\x06"
    assert f[28:32] == socket.inet_aton("10.77.0.100") == f[38:42]


def test_refusals_reach_the_audit_log_without_flooding_it(tmp_path: Path) -> None:
    now = [0.0]
    log = EventLog(tmp_path / "events.log")
    refusals = RefusalLog(log, "heartbeat_refused", interval=10.0, clock=lambda: now[0])
    for _ in range(500):
        refusals("forged")
    refusals("replayed")
    now[0] = 11.0
    refusals("forged")
    got = [(e["reason"], e["count"]) for e in log.read("flightdata")]
    # one line at the first refusal of each reason, then one per interval with the count
    assert got == [("forged", 1), ("replayed", 1), ("forged", 500)]
    assert all(e["module"] == "*" and e["event"] == "heartbeat_refused" for e in log.read())
