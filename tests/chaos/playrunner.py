"""The operators' playbooks, run by the nemesis through ansible-runner as AWX would.

The result keeps ansible-runner's per-host events and its final stats (ok, changed,
failures, dark = unreachable, per host), so the campaign asserts on them: no failed task,
and no unreachable host other than one the nemesis had crashed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ansible_runner

from ha_lab.lab import project_root

ROOT = project_root()


@dataclass
class PlayRun:
    playbook: str
    extravars: dict[str, Any]
    status: str
    rc: int
    seconds: float
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    stdout_tail: str = ""

    def per_host(self, key: str) -> dict[str, int]:
        return {h: int(n) for h, n in (self.stats.get(key) or {}).items() if n}

    def failed_tasks(self) -> list[str]:
        out = []
        for e in self.events:
            if e.get("event") in ("runner_on_failed", "runner_on_unreachable"):
                d = e.get("event_data", {})
                if d.get("ignore_errors"):
                    continue
                res = d.get("res", {})
                out.append(f"{d.get('host')}: {d.get('task')}: {str(res.get('msg', ''))[:300]}")
        return out

    def problems(self, crashed: set[str]) -> list[str]:
        """What the campaign treats as a failed step: failures, or unreachable live hosts."""
        found = []
        if self.per_host("failures"):
            found.append(f"failures {self.per_host('failures')}")
        dark = set(self.per_host("dark")) - crashed
        if dark:
            found.append(f"unreachable {sorted(dark)} (not crashed by the nemesis)")
        if self.status != "successful" and not found:
            found.append(f"status {self.status} rc {self.rc}")
        if found:
            found += self.failed_tasks()[:5]
            if not self.events:
                found.append(self.stdout_tail[-1500:])
        return found

    def brief(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook,
            "extravars": self.extravars,
            "status": self.status,
            "rc": self.rc,
            "seconds": round(self.seconds, 1),
            "ok": self.per_host("ok"),
            "changed": self.per_host("changed"),
            "failures": self.per_host("failures"),
            "unreachable": self.per_host("dark"),
        }


def run_playbook(
    playbook: str, extravars: dict[str, Any] | None = None, timeout: int = 900
) -> PlayRun:
    env = {
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hapair-chaos-runner.") as private:
        runner = ansible_runner.run(
            private_data_dir=private,
            project_dir=str(ROOT),
            playbook=str(ROOT / playbook),
            inventory=str(ROOT / "inventories" / "lab"),
            extravars=extravars or {},
            envvars=env,
            quiet=True,
            timeout=timeout,
        )
        events = list(runner.events)
        stats: dict[str, dict[str, int]] = dict(runner.stats or {})
        stdout = runner.stdout.read()
    return PlayRun(
        playbook,
        dict(extravars or {}),
        str(runner.status),
        int(runner.rc),
        time.monotonic() - started,
        stats,
        events,
        stdout[-4000:],
    )
