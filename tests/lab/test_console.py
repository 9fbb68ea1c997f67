"""The web console on the lab nodes, in headless Chromium on the controller (the host, on
the management network like an operator's workstation: the client namespace models the
application's clients and has a route to the LAN only).

Log in on node1's console, see both nodes (node2's row from node2's own console), switch
over, watch the VIP move (on the page and on the nodes' interfaces), see the event; then
stop node1 and start it again from its console while node2 writes alone, and watch the
resync's progress on node2's page; finally switch back from node2's page.
Screenshots: tests/artifacts/console/lab-*.png (gitignored)."""

from __future__ import annotations

import importlib.util
import subprocess
import time
from pathlib import Path

from labcmd import in_node
from playwright.sync_api import Page, expect
from repl import APP_DIR, MODULE, in_sync_pair, wait_state

from ha_lab.lab import Lab
from ha_lab.topology import node_ns

_spec = importlib.util.spec_from_file_location(
    "console_browser", Path(__file__).parents[1] / "unit/console/browser.py"
)
assert _spec and _spec.loader
_browser = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_browser)

CONSOLE = {"node1": "https://10.79.0.11:8443", "node2": "https://10.79.0.12:8443"}
USER, PASSWORD = "ops", "hapair-lab-operator"  # inventories/lab/group_vars/all/runtime.yml
VIP = "10.77.0.100"
WRITE_MB = 192


def _log_in(page: Page, node: str) -> None:
    page.goto(CONSOLE[node] + "/")
    expect(page).to_have_url(CONSOLE[node] + "/login")
    page.fill("input[name=user]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    expect(page).to_have_url(CONSOLE[node] + "/")


def _act(page: Page, button: str, result: str) -> None:
    page.click(f"#{button}-{MODULE}")
    expect(page.locator("#confirm")).to_be_visible()
    page.click("#confirm")
    expect(page.locator("#result")).to_contain_text(result, timeout=90_000)
    page.click("text=Back to the pair")


def _until(page: Page, text: str, timeout: float, absent: str | None = None) -> str:
    deadline = time.monotonic() + timeout
    while True:
        page.reload()
        html = page.content()
        if text in html and (absent is None or absent not in html):
            return html
        assert time.monotonic() < deadline, f"{text!r} never shown:\n{html[-3000:]}"
        time.sleep(0.3)


def _until_holder(page: Page, node: str, timeout: float) -> None:
    """Reload until the page names `node` as the VIP holder (page.content() re-serialises
    the DOM, quoting attributes: look at the element, not at the served text)."""
    deadline = time.monotonic() + timeout
    holder = page.locator(f"#module-{MODULE} .vip-holder")
    while holder.inner_text() != node:
        assert time.monotonic() < deadline, f"VIP holder on the page: {holder.inner_text()}"
        time.sleep(0.3)
        page.reload()


def _holds_vip(node: str) -> bool:
    # From the host, in the node's network namespace (as test_replication_faults does).
    out = subprocess.run(
        ["ip", "-n", node_ns(node), "-4", "-o", "addr", "show", "dev", "lan0"],
        capture_output=True, text=True, check=False, timeout=10,
    ).stdout  # fmt: skip
    return f" {VIP}/" in out


def test_console_switchover_and_resync_in_browser(mirror_site: Lab) -> None:
    lab = mirror_site
    prim, _ = in_sync_pair()
    if prim != "node1":
        assert in_node(lab, prim, "hactl", "swap", MODULE, timeout=90).returncode == 0
        in_sync_pair()
    with _browser.chromium() as ctx:
        page = ctx.new_page()
        _log_in(page, "node1")
        section = page.locator(f"#module-{MODULE}")
        expect(section.locator("td.node")).to_have_text(["node1", "node2"])
        expect(section.locator(".vip-holder")).to_have_text("node1")
        assert "Peer console not reachable" not in page.content()
        _browser.shot(page, "lab-01-pair")

        # Switchover from node1's page: the VIP moves, on the page and on the interfaces.
        _act(page, "swap", "switched over to node2")
        _until_holder(page, "node2", 30)
        # The new primary claims the role first, then adds the VIP: give it a moment.
        deadline = time.monotonic() + 15
        while not (_holds_vip("node2") and not _holds_vip("node1")):
            assert time.monotonic() < deadline, "the VIP is not (only) on node2's lan0"
            time.sleep(0.3)
        expect(page.locator("#events")).to_contain_text("console_action")
        expect(page.locator("#events")).to_contain_text("user=ops")
        _browser.shot(page, "lab-02-after-switchover")
        in_sync_pair()

        # node1 (now SECOND) stopped from its page; node2 writes alone; node1 started again.
        _act(page, "stop", "done")
        assert wait_state("node2", ("ALONE",), 30).get("state") == "ALONE"
        w = in_node(lab, "node2", "dd", "if=/dev/urandom", f"of={APP_DIR}/console-test.bin",
                    "bs=1M", f"count={WRITE_MB}", "conv=fsync", timeout=120)  # fmt: skip
        assert w.returncode == 0, w.stderr
        page2 = ctx.new_page()
        _log_in(page2, "node2")
        _act(page, "start", "done")
        html = _until(page2, "resync:", 60)
        assert "<progress" in html and "ETA" in html
        _browser.shot(page2, "lab-03-resync-progress")
        _until(page2, "): in sync</h3>", 300, absent="resync:")
        _browser.shot(page2, "lab-04-in-sync")
        in_sync_pair()
        assert in_node(lab, "node2", "rm", "-f", f"{APP_DIR}/console-test.bin").returncode == 0

        # Back as found: switched over from node2's page.
        _act(page2, "swap", "switched over to node1")
        _until_holder(page2, "node1", 30)
    in_sync_pair()
    events = in_node(lab, "node1", "hactl", "events", MODULE).stdout
    assert "console_action" in events and "ops" in events
