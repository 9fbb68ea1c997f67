"""The runtime tells its version: `hactl --version`, `hactl status --json`, ha_status."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

from ha_runtime.cli import format_status, with_versions
from ha_runtime.journal_log import JournalFormatter, journal_priority
from ha_runtime.version import runtime_version

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "collections"))

from ansible_collections.hapair.cluster.plugins.module_utils import hactl  # noqa: E402

PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_hactl_version_is_the_package_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ha_runtime.cli", "--version"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"hactl {PROJECT_VERSION}"
    assert runtime_version() == PROJECT_VERSION


def test_status_reports_the_daemons_version_and_the_installed_one() -> None:
    daemon = {"node": "node1", "version": "0.9.0", "modules": []}
    assert with_versions(daemon) == {**daemon, "installed_version": PROJECT_VERSION}
    old_daemon = {"node": "node1", "modules": []}  # a daemon from before versions
    assert with_versions(old_daemon)["version"] == PROJECT_VERSION
    assert format_status(with_versions(daemon)).startswith("node node1  hapair 0.9.0")


def test_ha_status_carries_the_version() -> None:
    text = json.dumps({"node": "node1", "version": "1.2.3", "modules": []})
    assert hactl.parse_status(text)["version"] == "1.2.3"
    assert hactl.parse_status(json.dumps([]))["version"] is None


def test_journal_lines_carry_their_syslog_priority() -> None:
    formatter = JournalFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("hapair", logging.WARNING, __file__, 1, "a\nb", None, None)
    assert formatter.format(record) == "<4>WARNING hapair: a\n<4>b"
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]
    assert [journal_priority(lv) for lv in levels] == [7, 6, 4, 3, 2]
