"""Spare replication children: started ahead of need, each waiting for its role.

A role change needs a new replication child, and a new interpreter spends 0.4-1 s of CPU
importing the runtime before it can mount or listen; in a switchover both nodes pay it, one
after the other. A ``SparePool`` keeps one ``hactl replicate spare`` process per replicated
directory, imported and blocked on its stdin; ``take`` hands it a role (protocol:
``replication.child``). A used spare is replaced a little later, once the application has
started, so that its imports do not take the CPU from it.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

# After a spare is used for the primary role, wait this long before starting the next one:
# its imports would otherwise take CPU from the application starting on the new primary.
# 1 s was too short on a loaded lab: flightdata took up to 1.2 s from the promotion to
# serving there, and the new spare's start (its interpreter and first imports at the
# daemon's priority) overlapped it. A role change within this delay uses a fresh child, as
# without spares. After the secondary role (no application starts here) the next spare is
# started at once: the upgrade's handover came 4.6 s after the new release's daemon had
# started as SECOND, found no spare, and its fresh child took 1.57 s of the 2 s bound.
REFILL_DELAY_S = 5.0


class SparePool:
    def __init__(self, name: str, count: int, command: Callable[[int], list[str]]) -> None:
        self.name = name
        self.count = count
        self.command = command
        self.spares: dict[int, trio.Process] = {}
        self._wanted = trio.Event()
        self._delay = REFILL_DELAY_S  # before the next refill: by the role last taken

    async def run(self) -> None:
        """Keep one live spare per directory until cancelled; then end them all."""
        try:
            while True:
                for i in range(self.count):
                    await self._fill(i)
                self._wanted = trio.Event()
                await self._wanted.wait()
                await trio.sleep(self._delay)
        finally:
            with trio.CancelScope(shield=True):
                for p in self.spares.values():
                    await drop(p)
                self.spares = {}

    async def _fill(self, index: int) -> None:
        p = self.spares.get(index)
        if p is not None and p.returncode is None:
            return
        if p is not None:
            log.warning("%s: a spare replication child exited (%s)", self.name, p.returncode)
            await drop(p)
        try:
            self.spares[index] = await trio.lowlevel.open_process(
                self.command(index), stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
        except OSError:
            log.exception("%s: cannot start a spare replication child", self.name)
            self.spares.pop(index, None)

    async def take(self, index: int, role: str) -> trio.Process | None:
        """The directory's spare, now running `role`; None if there is no live one."""
        spare = self.spares.pop(index, None)
        self._delay = REFILL_DELAY_S if role == "primary" else 0.0
        self._wanted.set()
        if spare is None:
            return None
        if spare.returncode is None and spare.stdin is not None:
            line = json.dumps({"cmd": "role", "role": role}) + "\n"
            try:
                await spare.stdin.send_all(line.encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # it died meanwhile
            else:
                return spare
        await drop(spare)
        return None


async def drop(p: trio.Process) -> None:
    """End an unused spare: closing its stdin makes it exit; kill it if it lingers."""
    for stream in (p.stdin, p.stdout):
        if stream is not None:
            await stream.aclose()
    with trio.move_on_after(2):
        await p.wait()
    if p.returncode is None:
        p.kill()
        await p.wait()
