"""The replication child's log lines carry the journald <N> priority prefix, like the daemon's:
its stderr is the unit's journal stream, so `journalctl -p warning -u hapair` shows them.
Its exit skips the interpreter's teardown and loses none of that output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import logging
from ha_runtime.replication.child import setup_logging
setup_logging("primary", "flightdata", 0)
log = logging.getLogger("hapair.replicate")
log.info("resync started")
log.warning("peer slow")
log.error("peer lost")
"""


def _stderr(journal: bool) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal:
        env["JOURNAL_STREAM"] = "8:12345"  # what systemd sets when stderr is the journal
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    )
    return out.stderr.splitlines()


@pytest.mark.parametrize("journal", [True, False])
def test_child_log_priorities(journal: bool) -> None:
    lines = _stderr(journal)
    assert len(lines) == 3, lines
    assert all("replicate[flightdata/0 primary]" in line for line in lines), lines
    if journal:
        assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"], lines
        assert lines[1].startswith("<4>WARNING replicate[flightdata/0 primary]"), lines
    else:
        assert not any(line.startswith("<") for line in lines), lines


EXITS = """
import atexit, logging, sys
from ha_runtime.replication.child import exit_at_once, setup_logging
setup_logging("secondary", "flightdata", 0)
atexit.register(lambda: print("finalized", flush=True))
sys.stdout.write('{"type": "status"}')  # buffered: must still reach the daemon
logging.getLogger("hapair.replicate").warning("stopping")
exit_at_once(3)
"""


def test_a_child_exits_without_finalization_and_loses_no_output() -> None:
    """A replication child ends with os._exit once its work is done: the daemon waits for
    that exit while the application is down, and the interpreter's teardown took up to
    0.9 s on a loaded node. Its last status line and log records still get out."""
    r = subprocess.run([sys.executable, "-c", EXITS], capture_output=True, timeout=60, check=False)
    assert (r.returncode, r.stdout) == (3, b'{"type": "status"}'), r
    assert b"stopping" in r.stderr, r
