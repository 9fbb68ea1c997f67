"""READY=1 waits for the modules: a real daemon, a real NOTIFY_SOCKET bound by the test."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import trio

from ha_runtime.config import load_site
from ha_runtime.daemon import NodeDaemon
from tests.sitefactory import FakeVip, free_port
from tests.unit.daemon.test_pair import KEY, _site


def _slow_prestart(tmp: Path, seconds: float) -> Path:
    """node1's module gets a prestart that takes `seconds`: its first decision comes after."""
    cluster = _site(tmp, "node1", free_port())
    done = tmp / "prestart.done"
    script = tmp / "node1" / "prestart"
    script.write_text(f"#!/bin/sh\nsleep {seconds}\ntouch {done}\n")
    script.chmod(0o755)
    module = tmp / "node1" / "modules" / "flightdata.yml"
    text = module.read_text().replace("timeout_s: 5}", f"prestart: {script}, timeout_s: 5}}")
    module.write_text(text)
    return cluster


def _run_collecting(
    tmp: Path, cluster: Path, monkeypatch: pytest.MonkeyPatch, timeout_s: float | None
) -> list[tuple[float, str, bool]]:
    """Run node1 until READY=1 (or 15 s); each message with its time and prestart.done."""
    address = str(tmp / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    daemon = NodeDaemon(load_site(cluster), KEY, vip_ops=FakeVip("node1", {}), metrics=False)
    if timeout_s is not None:
        daemon.settle_timeout_s = timeout_s
    got: list[tuple[float, str, bool]] = []
    start = time.monotonic()

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(daemon.run)
            with trio.fail_after(15):
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    msg = sock.recv(4096).decode()
                    got.append((time.monotonic() - start, msg, (tmp / "prestart.done").exists()))
                    if "READY=1" in msg.split("\n"):
                        break
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        sock.close()
    return got


def test_ready_only_after_first_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got = _run_collecting(tmp_path, _slow_prestart(tmp_path, 1.0), monkeypatch, None)
    when, ready, prestart_done = got[-1]
    # The module's prestart (before its first decision) had finished when READY=1 came.
    assert prestart_done, f"READY=1 at {when:.2f}s before the module's first decision: {got}"
    assert "STATUS=" in ready and "flightdata" in ready
    # Meanwhile systemd heard why it is not ready yet.
    assert any("STATUS=" in m and "READY=1" not in m and "flightdata" in m for _, m, _ in got)


def test_ready_after_settle_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got = _run_collecting(tmp_path, _slow_prestart(tmp_path, 5.0), monkeypatch, 0.5)
    when, ready, prestart_done = got[-1]
    # Bounded: a module stuck in its prestart does not hold the unit in "activating".
    assert not prestart_done and 0.5 <= when < 4.0, got
    assert "not settled" in ready and "flightdata" in ready
