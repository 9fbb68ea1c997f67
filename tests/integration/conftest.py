"""The integration tier runs as root on this host (FUSE, TLS, network namespaces).

Its tests exist to run here: a skip in this tier (a `skipif` on root or /dev/fuse, a
missing capability) is reported as a failure, so `make integration` never passes on
tests that did not run.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in the integration tier (it must run here, as root): {reason}"
