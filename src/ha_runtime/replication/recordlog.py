"""A durable append-only file of journal RECORD frames folded into an in-memory state: the
common part of the dirty log (``dirtylog``) and the activity log (``activitylog``).

Loading drops a torn or corrupt last record (detected by its MAC: its operation had not
been performed); more invalid bytes than ``TORN_MAX`` mark the state lost. Compaction
rewrites the file as the coalesced state (atomically: temp file, fsync, rename, fsync of
the directory).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from ha_runtime.replication.journal import Op, Record, read_records, record_frame

log = logging.getLogger("hapair.replication")

LOST_FLAG = 0xFFFFFFFF  # SETATTR(b"", flags=LOST_FLAG): the log is not trustworthy
TORN_MAX = 16 << 10  # a torn tail is at most one record; more invalid bytes = corruption


class LogState(Protocol):
    lost: bool

    def apply(self, rec: Record) -> None: ...
    def snapshot_records(self) -> list[Record]: ...


S = TypeVar("S", bound=LogState)


def _write_all(fd: int, data: bytes) -> None:
    """One write of a whole frame; a short one (the disk filling up) is an error."""
    if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, "short write to a log file")


class RecordLog(Generic[S]):
    """A durable append-only file of RECORD frames folded into an in-memory state ``S``:
    loading with a torn tail dropped, appending, group commit, compaction, clearing.
    Thread-safe (FUSE handlers may call ``sync`` from worker threads)."""

    def __init__(self, path: Path, compact_bytes: int = 8 << 20) -> None:
        self.path = path
        self.compact_bytes = compact_bytes
        self.state = self._new_state()
        self.rejected: dict[str, int] = {}
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._fd = -1
        self._written = 0
        self._synced = 0
        self._size = 0
        self._compacted = 0

    def _new_state(self) -> S:
        raise NotImplementedError

    # -- lifecycle
    def open(self) -> None:
        """Load the log (dropping a torn tail) and open it for appending."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        recs, good, rejected = read_records(data)
        self.rejected = dict(rejected)
        for r in recs:
            self.state.apply(r)
        if len(data) - good > TORN_MAX:
            self.state.lost = True  # corruption, not a torn last record
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if good != len(data):
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
        self._size = good
        os.lseek(self._fd, good, os.SEEK_SET)
        if self.state.lost and not any(r.flags == LOST_FLAG for r in recs):
            self._append(record_frame(Record(0, Op.SETATTR, b"", flags=LOST_FLAG)))
            os.fsync(self._fd)
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- recording
    def mark_lost(self) -> None:
        """The log cannot be trusted (e.g. I/O error): a full resync will be needed."""
        with self._lock:
            self.state.lost = True
            self._append(record_frame(Record(0, Op.SETATTR, b"", flags=LOST_FLAG)))

    def _append(self, frame: bytes) -> None:
        try:
            _write_all(self._fd, frame)
        except OSError:
            # A torn frame would hide every record appended after it (a reader stops there).
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
                os.lseek(self._fd, self._size, os.SEEK_SET)
            raise
        self._written += len(frame)
        self._size += len(frame)

    def sync(self, upto: int | None = None) -> None:
        """fsync so that everything up to ``upto`` (default: all written) is durable.
        Concurrent callers share one fsync (group commit)."""
        target = self._written if upto is None else upto
        if target <= self._synced:
            return
        with self._sync_lock:
            if target <= self._synced:
                return
            mark = self._written
            os.fsync(self._fd)
            self._synced = max(self._synced, mark)
        if self._size > max(self.compact_bytes, 2 * self._compacted):
            try:
                self.compact()
            except OSError as e:  # only a smaller file lost: the records are durable
                log.warning("cannot compact %s: %s", self.path, e)

    def compact(self) -> None:
        with self._lock, self._sync_lock:
            tmp = self.path.with_suffix(".compact")
            blob = b"".join(record_frame(r) for r in self.state.snapshot_records())
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, blob)
                os.fsync(fd)
            except OSError:
                tmp.unlink(missing_ok=True)  # a full disk: give its space back
                raise
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            os.lseek(self._fd, 0, os.SEEK_END)
            self._size = self._compacted = len(blob)
            self._written += 1  # positions only grow; anything written is now durable
            self._synced = self._written

    def clear(self) -> None:
        """Resync done: forget everything (durably)."""
        with self._lock, self._sync_lock:
            self.state = self._new_state()
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.fsync(self._fd)
            self._size = 0
            self._synced = self._written

    @property
    def size(self) -> int:
        return self._size


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(path: Path, state: S) -> tuple[S | None, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "is missing"
    except OSError as e:
        return None, f"is unreadable ({e.strerror})"
    recs, good, _ = read_records(data)
    for r in recs:
        state.apply(r)
    if len(data) - good > TORN_MAX:
        state.lost = True
    return state, ""
