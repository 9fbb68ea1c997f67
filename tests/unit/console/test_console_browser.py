"""The console in a real browser (headless Chromium): log in, see both nodes, switch over
with the confirmation, watch the VIP move, see the event; a viewer sees no action; the
page loads nothing and breaks no rule of its Content-Security-Policy.
Screenshots: tests/artifacts/console/."""

from __future__ import annotations

import time
from pathlib import Path

from playwright.sync_api import ConsoleMessage, Page, expect

from .browser import chromium, shot
from .pair import PASSWORDS, Pair, run_pair


def _log_in(page: Page, base: str, user: str) -> None:
    page.goto(base + "/")
    expect(page).to_have_url(base + "/login")
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", PASSWORDS[user])
    page.click("button:has-text('Log in')")
    expect(page).to_have_url(base + "/")


def test_browser_login_switchover_and_event(tmp_path: Path) -> None:
    problems: list[str] = []
    requests: list[str] = []

    def scenario(p: Pair) -> None:
        base = f"https://{p.urls['node1']}"
        with chromium() as ctx:
            page = ctx.new_page()
            page.on("console", lambda m: problems.append(m.text) if _bad(m) else None)
            page.on("request", lambda r: requests.append(r.url))
            page.goto(base + "/")
            expect(page).to_have_url(base + "/login")
            shot(page, "01-login")
            _log_in(page, base, "ops")
            section = page.locator("#module-flightdata")
            expect(section.locator("td.node")).to_have_text(["node1", "node2"])
            expect(section.locator(".vip-holder")).to_have_text("node1")
            shot(page, "02-pair-node1-primary")

            page.click("#swap-flightdata")
            expect(page.locator("h2")).to_contain_text("Confirm: Switch over flightdata")
            shot(page, "03-confirm-switchover")
            assert p.holders == {"flightdata": "node1"}
            page.click("#confirm")
            expect(page.locator("#result")).to_contain_text("switched over to node2")
            page.click("text=Back to the pair")
            deadline = time.monotonic() + 15
            while page.locator(".vip-holder").inner_text() != "node2":
                assert time.monotonic() < deadline, "the VIP did not move on the page"
                time.sleep(0.3)
                page.reload()
            assert p.holders == {"flightdata": "node2"}
            events = page.locator("#events")
            expect(events).to_contain_text("console_action")
            expect(events).to_contain_text("user=ops")
            shot(page, "04-pair-after-switchover")

            page.click("button:has-text('Log out')")
            expect(page).to_have_url(base + "/login")
            _log_in(page, base, "viewer")
            expect(page.locator("#module-flightdata")).to_be_visible()
            assert page.locator("#swap-flightdata").count() == 0
            shot(page, "05-viewer")

    run_pair(tmp_path, scenario)
    assert not problems, problems
    assert requests and all(r.startswith("https://127.0.0.1:") for r in requests), requests


def _bad(m: ConsoleMessage) -> bool:
    return m.type == "error" or "Content Security Policy" in m.text
