"""Append-only audit log of every transition, one JSON object per line.

Each record is written with O_APPEND and fsync'd before the transition is considered
done, so an audit trail survives the crash that follows it. Nothing secret goes here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

NODE_WIDE = "*"  # the module of events about the node, shown with every module's events


class EventLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, module: str, event: str, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z",
            "ts": round(time.time(), 3),
            "module": module,
            "event": event,
            **fields,
        }
        line = (json.dumps(record, sort_keys=False, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return record

    def read(self, module: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        records = [
            r for r in self._iter() if module is None or r.get("module") in (module, NODE_WIDE)
        ]
        return records[-limit:] if limit else records

    def _iter(self) -> Iterator[dict[str, Any]]:
        try:
            with self.path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:  # a torn last line after a crash: skip it
                        continue
                    if isinstance(rec, dict):
                        yield rec
        except FileNotFoundError:
            return


class RefusalLog:
    """Refused input (forged or replayed heartbeats...) made visible in the audit log
    without letting a flood of it write the log: the first refusal of a reason is logged at
    once, later ones at most once per ``interval`` with how many were refused since."""

    def __init__(
        self,
        events: EventLog,
        event: str,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events = events
        self.event = event
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._pending: dict[str, int] = {}

    def __call__(self, reason: str) -> None:
        now = self.clock()
        self._pending[reason] = self._pending.get(reason, 0) + 1
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            return
        self._last[reason] = now
        count = self._pending.pop(reason)
        self.events.append(NODE_WIDE, self.event, reason=reason, count=count)
