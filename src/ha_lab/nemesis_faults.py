"""Faults inside a lab node that `Lab` has no verb for, used by the fault campaign.

`Lab` cuts links, drops packets, crashes, boots and fills; a campaign also needs process
faults inside a node: kill -9 the hapair daemon (systemd restarts it: Restart=on-failure),
kill -9 an application (hapair's checker must notice and restart it), saturate the node's
CPUs, and undo a `Lab.fill`. Each runs one precise command inside the node (by unit name,
never by a process-name pattern), and each inject has its heal.
"""

from __future__ import annotations

import subprocess
import time

from .lab import Lab

RUNTIME_UNIT = "hapair.service"  # collection role runtime: templates/hapair.service.j2
CPU_UNIT = "ha-lab-cpuburn"  # a transient unit: `systemctl stop` takes every busy loop


def _run(lab: Lab, node: str, argv: list[str], timeout: float = 60) -> str:
    proc = subprocess.run(
        lab.exec_argv(node, argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{node}: {' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def kill_unit_main(lab: Lab, node: str, unit: str) -> None:
    """SIGKILL the main process of a unit (kill -9 of the daemon or the application)."""
    _run(lab, node, ["systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", unit])


def start_unit(lab: Lab, node: str, unit: str) -> None:
    _run(lab, node, ["systemctl", "start", unit], timeout=120)


def kill_runtime(lab: Lab, node: str) -> None:
    kill_unit_main(lab, node, RUNTIME_UNIT)


def unit_active(lab: Lab, node: str, unit: str) -> bool:
    proc = subprocess.run(
        lab.exec_argv(node, ["systemctl", "is-active", "--quiet", unit]),
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return proc.returncode == 0


def heal_runtime(lab: Lab, node: str, timeout: float = 30) -> float:
    """Wait for systemd to restart the daemon (start it if it did not); seconds waited."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if unit_active(lab, node, RUNTIME_UNIT):
            return time.monotonic() - started
        time.sleep(0.25)
    _run(lab, node, ["systemctl", "start", RUNTIME_UNIT], timeout=120)
    return time.monotonic() - started


def cpu_burn(lab: Lab, node: str, workers: int) -> None:
    """One busy loop per worker in the node, at normal priority, in a transient unit."""
    loops = " ".join(["(while :; do :; done) &"] * workers)
    _run(lab, node, ["systemd-run", f"--unit={CPU_UNIT}", "--collect", "--quiet",
                     "sh", "-c", f"{loops} wait"])  # fmt: skip


def cpu_stop(lab: Lab, node: str) -> None:
    subprocess.run(
        lab.exec_argv(node, ["systemctl", "stop", CPU_UNIT]),
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip


def unfill(lab: Lab, node: str, path: str) -> None:
    """Remove what `Lab.fill(node, path)` wrote."""
    filler = f"{path.rstrip('/')}/.ha-lab-fill"
    _run(lab, node, ["rm", "-f", filler, f"{filler}.tail"], timeout=300)
