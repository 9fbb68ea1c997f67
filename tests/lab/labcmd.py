"""Commands inside lab nodes, shared by the lab tests."""

from __future__ import annotations

import subprocess

from ha_lab.lab import Lab


def in_node(
    lab: Lab, node: str, *argv: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        lab.exec_argv(node, list(argv)),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ping(lab: Lab, node: str, address: str, count: int = 1) -> bool:
    proc = in_node(lab, node, "ping", "-n", "-q", "-c", str(count), "-W", "1", address)
    return proc.returncode == 0
