"""`hactl wait`: until a module is in one of some states on this node, in one process.

Playbooks used to poll `hactl status --json` five times a second. Each poll was a fresh
interpreter (about 0.45 s of CPU on a lab node, trio and the configuration imported), so a
switchover's wait kept a CPU busy on the very node where the application was starting: its
start took 0.6 s instead of 0.15 s. Here one process asks the daemon's API every
`interval` (about 10 ms of the daemon's CPU per answer) until the state is reached.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

SYNC_STATES = ("in-sync", "resyncing")
POLL_INTERVAL_S = 0.1

Status = dict[str, Any]


class Refused(Exception):
    """The daemon answered and refused (an unknown module): asking again changes nothing."""


@dataclass
class WaitResult:
    reached: bool
    status: Status | None  # the last status the daemon gave (None: it never gave one)
    error: str | None  # the last reason it did not answer or refused, if any
    refused: bool = False


def module_entry(status: Status | None, module: str) -> dict[str, Any] | None:
    for entry in (status or {}).get("modules", []):
        if isinstance(entry, dict) and module in (entry.get("name"), entry.get("module")):
            return entry
    return None


def matches(entry: dict[str, Any] | None, wanted: Sequence[str], sync: str | None) -> bool:
    """In one of `wanted`; a SECOND also in the `sync` sub-state when one is asked for."""
    if entry is None or str(entry.get("state", "")).upper() not in wanted:
        return False
    if sync and str(entry.get("state", "")).upper() == "SECOND":
        return str(entry.get("sync", "")).lower() == sync
    return True


def wait_for_state(
    ask: Callable[[], Status],
    module: str,
    wanted: Sequence[str],
    *,
    sync: str | None = None,
    timeout: float = 60.0,
    interval: float = POLL_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> WaitResult:
    """Ask until `module` matches or `timeout` passed. A daemon that does not answer (it may
    be restarting) is asked again, its reason kept for the report; a refusal ends the wait."""
    deadline = clock() + timeout
    status: Status | None = None
    error: str | None = None
    while True:
        try:
            status = ask()
            error = None
        except Refused as exc:
            return WaitResult(False, status, str(exc), refused=True)
        except (OSError, ValueError, TypeError) as exc:
            error = str(exc)
        if matches(module_entry(status, module), wanted, sync) and error is None:
            return WaitResult(True, status, None)
        if clock() >= deadline:
            return WaitResult(False, status, error)
        sleep(interval)
