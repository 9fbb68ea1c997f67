"""Running host commands and finding the lab's processes and mounts.

Everything the lab does to the host goes through `run`, so a failure always reports
the exact command and its error output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path


class LabError(RuntimeError):
    """A lab operation failed; the message says which command and why."""


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    input_text: str | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, raise LabError with stderr on failure."""
    try:
        proc = subprocess.run(
            list(cmd),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise LabError(f"{cmd[0]}: command not found (run `make setup`)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(cmd)}: timed out after {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"{' '.join(cmd)}: exit {proc.returncode}: {detail}")
    return proc


def cmdline(pid: int) -> list[str]:
    """The argv of a process, or [] when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children(pid: int) -> list[int]:
    """Direct children of a process (from /proc, no psutil needed)."""
    found = []
    for candidate in all_pids():
        try:
            stat = Path(f"/proc/{candidate}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(candidate)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purposes: it holds no namespace or mount.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_and_wait(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGKILL processes and wait until they are gone (reaping our own children)."""
    targets = [pid for pid in pids if alive(pid)]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in targets:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if not any(alive(pid) for pid in targets):
            return
        time.sleep(0.05)
    still = [pid for pid in targets if alive(pid)]
    if still:
        raise LabError(f"processes {still} survived SIGKILL for {timeout:.0f} s")


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points at or below prefix, deepest first (the order to unmount them)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(prefix) or point.startswith(f"{prefix}/"):
            points.append(Path(point))
    return sorted(set(points), key=lambda p: len(p.parts), reverse=True)


def unmount_all(prefix: Path) -> None:
    """Unmount everything below prefix; lazily when a mount is still busy."""
    for point in mounts_under(prefix):
        if run(["umount", str(point)], check=False).returncode != 0:
            run(["umount", "-l", str(point)], check=False)
