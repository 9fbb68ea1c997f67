"""Run the operators' playbooks from tests through ansible-runner, and read its events.

Python code that runs playbooks goes through ansible-runner (as AWX does), so a test
sees per-host events: which play and task ran, what changed, what failed and why.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ansible_runner

from ha_lab.lab import project_root

ROOT = project_root()


@dataclass
class PlaybookResult:
    status: str
    rc: int
    events: list[dict[str, Any]] = field(default_factory=list)
    stdout: str = ""

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    @property
    def plays(self) -> list[str]:
        return [str(e["event_data"].get("play", "")) for e in self.of("playbook_on_play_start")]

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [e["event_data"] for e in self.of("runner_on_failed")]

    @property
    def changed(self) -> list[dict[str, Any]]:
        return [
            e["event_data"]
            for e in self.of("runner_on_ok")
            if e["event_data"].get("res", {}).get("changed")
        ]

    def failure_summary(self) -> str:
        lines = [f"status {self.status}, rc {self.rc}"]
        for f in self.failures:
            where = f"{f.get('host')}: [{f.get('play')}] {f.get('task')}"
            lines.append(f"{where}: {failure_message(f)}")
        for e in self.of("runner_on_unreachable"):
            res = e["event_data"].get("res", {})
            lines.append(f"unreachable: {e['event_data'].get('host')}: {res.get('msg', '')}")
        if len(lines) == 1:  # nothing failed in a task: the end of ansible-playbook's output
            lines.append(self.stdout[-3000:])
        return "\n".join(lines)


def failure_message(event_data: dict[str, Any]) -> str:
    """The message of a failed task, with those of its failed loop items."""
    res = event_data.get("res", {})
    parts = [str(res.get("msg", ""))]
    parts += [str(r.get("msg", "")) for r in res.get("results", []) if r.get("failed")]
    return " | ".join(p for p in parts if p)


def run_playbook(
    playbook: str,
    inventory: Path | None = None,
    extravars: dict[str, Any] | None = None,
    timeout: int = 1800,
    *,
    envvars: dict[str, str] | None = None,
    cmdline: str | None = None,
) -> PlaybookResult:
    """Run a playbook of the repository against an inventory (default: the lab's).

    envvars adds to the controller's environment (HOME=... is another controller account);
    cmdline adds ansible-playbook options (--check --diff, --tags ...).
    """
    env = {
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
        # ansible-playbook of the same virtualenv as these tests.
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        **(envvars or {}),
    }
    with tempfile.TemporaryDirectory(prefix="hapair-runner.") as private:
        runner = ansible_runner.run(
            private_data_dir=private,
            project_dir=str(ROOT),
            playbook=str(ROOT / playbook),
            inventory=str(inventory or ROOT / "inventories" / "lab"),
            extravars=extravars or {},
            envvars=env,
            quiet=True,
            cmdline=cmdline,
            timeout=timeout,
        )
        events = list(runner.events)
        stdout = runner.stdout.read()
    return PlaybookResult(str(runner.status), int(runner.rc), events, stdout)
