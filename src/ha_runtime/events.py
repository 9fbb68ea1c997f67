"""Append-only audit log of every transition, one JSON object per line.

Each record is written with O_APPEND and fsync'd before the transition is considered
done, so an audit trail survives the crash that follows it. Nothing secret goes here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
        records = [r for r in self._iter() if module is None or r.get("module") == module]
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
