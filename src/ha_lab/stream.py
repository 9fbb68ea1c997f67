"""The one format of every client stream: JSON lines from the lab's client namespace.

A client that reports as it goes (the record writer `ha_lab.records write`, the VIP probe
`ha_lab.probe`, the farm's held connections `ha_lab.farm_client hold`) runs as its own
process in the client namespace (Python 3.11 has no os.setns) and writes, with `emit`, one
JSON object a line to stdout. Every line carries "t", the CLOCK_MONOTONIC time of the
event: the host and every namespace share that clock, so the controller compares it with
the moment it crashed or booted a node.

On the controller, `ClientStream` starts the client and reads its lines on a thread,
turning each into the client's record type with a `convert` function. A line that is not
a JSON object, or that `convert` refuses (a field missing or of the wrong type), is
counted in `bad_lines` and dropped: a client killed mid-line or a stray print costs one
line, never the reader thread and with it every later record.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Generic, TypeVar

T = TypeVar("T")

# What a `convert` function raises for a line it refuses.
REFUSED = (KeyError, TypeError, ValueError)


def emit(out: IO[str], **fields: Any) -> None:
    """Write one record as a JSON line and flush it (the reader waits on every line)."""
    out.write(json.dumps(fields) + "\n")
    out.flush()


def parse(line: str, convert: Callable[[dict[str, Any]], T | None]) -> tuple[bool, T | None]:
    """(True, record) for a good line, (False, None) for a bad one; never raises for bad
    input. `convert` may itself return None for a good line (a failed request)."""
    try:
        data = json.loads(line)
    except ValueError:
        return False, None
    if not isinstance(data, dict):
        return False, None
    try:
        return True, convert(data)
    except REFUSED:
        return False, None


def optional_str(value: object) -> str | None:
    """A field that is a string or null ("node": who answered, null when nobody did)."""
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"not a string or null: {value!r}")


def optional_int(value: object) -> int | None:
    """A field that is an integer or null (bool is refused: JSON true is not a number)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(f"not an integer or null: {value!r}")


def time_of(data: dict[str, Any]) -> float:
    """The "t" field every line carries: a number (CLOCK_MONOTONIC seconds)."""
    t = data["t"]
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise TypeError(f"t is not a number: {t!r}")
    return float(t)


class ClientStream(Generic[T]):
    """A client process and the records read from its JSON lines so far.

    `convert` turns a line's object into a record; it may return None for a line that is
    good but carries no record (kept as None in `records`, for the caller to count)."""

    def __init__(self, argv: Sequence[str], convert: Callable[[dict[str, Any]], T | None]) -> None:
        self.argv = list(argv)
        self.convert = convert
        self.bad_lines = 0
        self._records: list[T | None] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> ClientStream[T]:
        # errors="replace": bytes that are not UTF-8 make a bad line, not a dead reader.
        self._proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, text=True, errors="replace"
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def feed(self, lines: Sequence[str] | IO[str]) -> None:
        """Read lines as the reader thread does (the thread feeds the client's stdout)."""
        for line in lines:
            good, record = parse(line, self.convert)
            with self._lock:
                if good:
                    self._records.append(record)
                else:
                    self.bad_lines += 1

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        self.feed(self._proc.stdout)

    def records(self) -> list[T | None]:
        """Every good line so far, in order (None where `convert` gave no record)."""
        with self._lock:
            return list(self._records)

    def wait(self, done: Callable[[list[T | None]], bool], timeout: float, poll: float) -> bool:
        """Poll until `done(records)` holds; False when `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.records()):
                return True
            time.sleep(poll)
        return False

    def stop(self) -> list[T | None]:
        """End the client (if still running), read what it wrote, return every record."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return self.records()
