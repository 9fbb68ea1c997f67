"""Run the module's user scripts (start_prim, stop_prim, prestart, poststop).

Each run has a timeout; on expiry the script's whole process group gets SIGTERM, then
SIGKILL after a grace period, so a hung script can never block a failover. Output goes to
our log (the journal under systemd), line by line, tagged with module and script.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger("hapair.scripts")

KILL_GRACE_S = 5.0
SCRIPT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ScriptResult:
    script: str
    returncode: int | None  # None: killed after the timeout
    duration_s: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        if self.timed_out:
            return f"{self.script} timed out after {self.duration_s:.1f}s and was killed"
        if self.returncode == 0:
            return f"{self.script} succeeded in {self.duration_s:.1f}s"
        return f"{self.script} failed with exit code {self.returncode}"


def script_env(
    *, module: str, node: str, peer: str, script: str, transition: str, reason: str, vip: str
) -> dict[str, str]:
    # A fixed, small environment: scripts behave the same under systemd and by hand, and
    # nothing of the daemon's environment (which could hold secrets) leaks into them.
    return {
        "PATH": SCRIPT_PATH,
        "LANG": "C.UTF-8",
        "HAPAIR_MODULE": module,
        "HAPAIR_NODE": node,
        "HAPAIR_PEER": peer,
        "HAPAIR_SCRIPT": script,
        "HAPAIR_TRANSITION": transition,
        "HAPAIR_REASON": reason,
        "HAPAIR_VIP": vip,
    }


async def run_script(
    path: Path | list[str],
    env: dict[str, str],
    timeout_s: float,
    *,
    label: str,
    grace_s: float = KILL_GRACE_S,
) -> ScriptResult:
    argv = [str(path)] if isinstance(path, Path) else list(path)
    start = time.monotonic()
    try:
        proc = await trio.lowlevel.open_process(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: the timeout kills its children too
        )
    except OSError as exc:
        failure = exc.strerror or str(exc)
    else:
        failure = ""
    if failure:
        log.error("%s: cannot run %s: %s", label, argv[0], failure)
        return ScriptResult(label, 127, 0.0)
    timed_out = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump_output, proc, label)
        with trio.move_on_after(timeout_s) as scope:
            await proc.wait()
        if scope.cancelled_caught:
            timed_out = True
            log.warning("%s: timed out after %.1fs, sending SIGTERM", label, timeout_s)
            _killpg(proc.pid, signal.SIGTERM)
            with trio.move_on_after(grace_s) as grace:
                await proc.wait()
            if grace.cancelled_caught:
                log.warning(
                    "%s: still running %.1fs after SIGTERM, sending SIGKILL", label, grace_s
                )
                _killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        # Children that kept the pipe open must not hold us: stop reading once it exited.
        with trio.move_on_after(1):
            await _drain_done(nursery)
        nursery.cancel_scope.cancel()
    result = ScriptResult(
        label, None if timed_out else proc.returncode, time.monotonic() - start, timed_out
    )
    (log.info if result.ok else log.error)("%s: %s", label, result.describe())
    return result


async def _drain_done(nursery: trio.Nursery) -> None:
    while nursery.child_tasks:
        await trio.sleep(0.02)


async def _pump_output(proc: trio.Process, label: str) -> None:
    assert proc.stdout is not None
    buf = b""
    async for chunk in proc.stdout:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            log.info("%s: %s", label, line.decode(errors="replace").rstrip())
    if buf:
        log.info("%s: %s", label, buf.decode(errors="replace").rstrip())


def _killpg(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
