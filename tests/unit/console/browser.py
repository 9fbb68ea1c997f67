"""Debian's headless Chromium driven by playwright (never `playwright install`)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import BrowserContext, sync_playwright

CHROMIUM = "/usr/bin/chromium"  # apt: chromium (Makefile APT_PACKAGES)
ARTIFACTS = Path(__file__).parents[2] / "artifacts" / "console"  # gitignored


@contextlib.contextmanager
def chromium() -> Iterator[BrowserContext]:
    """A browser with a fresh profile (its --user-data-dir), trusting any certificate: the
    test site's CA is not in the browser's store (a site installs its CA)."""
    with tempfile.TemporaryDirectory(prefix="hapair-chromium-") as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
            ],
            ignore_https_errors=True,
            viewport={"width": 1200, "height": 800},
        )  # fmt: skip
        try:
            yield ctx
        finally:
            ctx.close()


def shot(page: object, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    return path
