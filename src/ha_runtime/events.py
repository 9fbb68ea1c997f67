"""Append-only audit log of every transition, one JSON object per line.

Each record is written with O_APPEND and fsync'd before the transition is considered
done, so an audit trail survives the crash that follows it. Nothing secret goes here.

The log rotates by size: before a record would take the file past ``max_bytes`` it is
renamed ``events.jsonl.1`` (older ones shift to ``.2`` ... ``.keep``, the oldest beyond is
dropped) and the directory fsync'd, so a record is always in exactly one durable file.
Readers read the rotated files oldest first, then the current one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

NODE_WIDE = "*"  # the module of events about the node, shown with every module's events


DEFAULT_MAX_BYTES = 16 << 20  # a busy site writes far less than this per month
DEFAULT_KEEP = 5


class EventLog:
    def __init__(
        self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep

    def _rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _rotate_for(self, size: int) -> None:
        """Rotate first when `size` more bytes would take the current file past the bound."""
        try:
            current = self.path.stat().st_size
        except FileNotFoundError:
            return
        if current == 0 or current + size <= self.max_bytes:
            return
        # Every record was fsync'd when written; this one makes the closing file whole.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._rotated(self.keep).unlink(missing_ok=True)
        for n in range(self.keep - 1, 0, -1):
            if self._rotated(n).exists():
                os.rename(self._rotated(n), self._rotated(n + 1))
        os.rename(self.path, self._rotated(1))
        # The renames durable before the next record goes into a new file.
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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
        self._rotate_for(len(line))
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
        for n in range(self.keep, 0, -1):
            yield from _records(self._rotated(n))
        yield from _records(self.path)


def _records(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with path.open(encoding="utf-8") as fh:
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
