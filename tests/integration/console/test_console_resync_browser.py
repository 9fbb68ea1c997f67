"""The console during a resync, in headless Chromium: two daemons replicating a directory
through FUSE on loopback (root + /dev/fuse, this host). node2 is stopped from its console,
node1 writes alone, node2 is started again from its console; node1's page shows the
resync's progress (bytes, rate, ETA) while it runs, then the pair in sync.
Screenshot: tests/artifacts/console/06-resync-progress.png."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from prometheus_client import generate_latest

from tests.unit.console.browser import chromium, shot
from tests.unit.console.pair import PASSWORDS, Pair, run_pair

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="root+FUSE"),
]

FILES, FILE_MB = 32, 8  # 256 MiB to resync (about 5 s here): a few page loads


def _write(app: Path) -> None:
    block = os.urandom(1 << 20)
    for i in range(FILES):
        with (app / f"f{i:03d}.bin").open("wb") as f:
            for _ in range(FILE_MB):
                f.write(block)
            os.fsync(f.fileno())


def _act(p: Pair, node: str, action: str) -> None:
    cookie = p.login("ops", node=node)
    form = {"csrf": p.csrf(cookie, node), "module": "flightdata", "action": action}
    r = p.request("POST", "/confirm", node=node, cookie=cookie, form=form)
    assert r.status == 200, r.body[-400:]


def test_browser_shows_resync_progress(tmp_path: Path) -> None:
    seen: dict[str, str] = {}

    def scenario(p: Pair) -> None:
        base = f"https://{p.urls['node1']}"
        _act(p, "node2", "stop")
        m1 = p.d1.modules["flightdata"]
        deadline = time.monotonic() + 15
        while m1.state.name != "ALONE":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        _write(tmp_path / "node1" / "app")
        with chromium() as ctx:
            page = ctx.new_page()
            page.goto(base + "/")
            page.fill("input[name=user]", "ops")
            page.fill("input[name=password]", PASSWORDS["ops"])
            page.click("button:has-text('Log in')")
            expect(page.locator(".vip-holder")).to_have_text("node1")
            _act(p, "node2", "start")
            seen["progress"] = _until(page, "resync:", 60)
            shot(page, "06-resync-progress")
            seen["in_sync"] = _until(page, "): in sync</h3>", 120, absent="resync:")
            shot(page, "07-after-resync")
        # In sync, an fsync waits for node2's acknowledgement: the exporter's histogram has it.
        with (tmp_path / "node1" / "app" / "sync.txt").open("wb") as f:
            f.write(b"acked\n")
            os.fsync(f.fileno())
        # The child reports twice a second, the daemon snapshots every second.
        deadline = time.monotonic() + 15
        while True:
            text = generate_latest(p.d1.metrics.registry).decode()
            count = re.search(
                r"^hapair_replication_ack_latency_seconds_count\{.*\} (\S+)$", text, re.M
            )
            if count or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        seen["acks"] = count.group(1) if count else "absent"
        inf = re.search(r"^hapair_resync_running\{.*\} (\S+)$", text, re.M)
        seen["running"] = inf.group(1) if inf else "absent"

    run_pair(tmp_path, scenario, replicated=True)
    assert "<progress" in seen["progress"] and "ETA" in seen["progress"], seen["progress"]
    assert "resyncing" in seen["progress"]
    assert "resync of flightdata to node2 running" in seen["progress"]  # the advice box
    assert seen["acks"] != "absent" and float(seen["acks"]) >= 1, seen
    assert seen["running"] == "0.0", seen


def _until(page: Page, text: str, timeout: float, absent: str | None = None) -> str:
    """Reload node1's page until `text` shows (and `absent` does not); its HTML."""
    deadline = time.monotonic() + timeout
    while True:
        page.goto(page.url.split("/", 3)[0] + "//" + page.url.split("/", 3)[2] + "/")
        html = page.content()
        if text in html and (absent is None or absent not in html):
            return html
        assert time.monotonic() < deadline, f"{text!r} never shown:\n{html[-3000:]}"
        time.sleep(0.2)
