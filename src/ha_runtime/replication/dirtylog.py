"""Durable record of what changed while the peer was away (the resync bitmap of DRBD, at byte
granularity per path).

The file is a sequence of journal RECORD frames (``journal.read_records``):

- ``WRITE(path, offset, length)`` with no data: bytes ``[offset, offset+length)`` changed;
- ``TRUNCATE(path, offset=size)``: everything from ``size`` on is dirty (a shrink then a
  regrow must not leave the peer's old bytes behind);
- ``RENAME(path, path2)``: replayed on the peer before reconciling, so moved files need not
  travel again;
- any other namespace op (create, unlink, mkdir, setattr, xattrs, ...): its paths are
  *touched*: existence, type, metadata and size are reconciled with the primary's.

``note(rec)`` appends what ``rec`` adds (nothing when its range is already covered: a
rewrite of a dirty range costs no I/O). ``sync()`` makes it durable; the FUSE layer calls
it **before** performing the operation on the backing directory, so a crash of the primary
never leaves a changed byte unrecorded. A torn or corrupt last record is detected by its
MAC and dropped (its operation had not been performed). Compaction rewrites the file as
the coalesced state (atomically: temp file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ha_runtime.replication.journal import NAMESPACE_OPS, Op, Record, read_records, record_frame

INF = 1 << 62
LOST_FLAG = 0xFFFFFFFF  # SETATTR(b"", flags=LOST_FLAG): the log is not trustworthy
TORN_MAX = 16 << 10  # a torn tail is at most one record; more invalid bytes = corruption
# A write that extends a file is recorded up to the next multiple of this, so the appends
# that follow are already covered and cost no log fsync (a streaming writer would otherwise
# pay one per write). Resync clips ranges to the file's size: no extra byte travels.
APPEND_EXTENT = 4 << 20


@dataclass
class RangeSet:
    """Sorted disjoint half-open intervals with coalescing."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    def covers(self, a: int, b: int) -> bool:
        if b <= a:
            return True
        i = bisect.bisect_right(self.starts, a) - 1
        return i >= 0 and self.ends[i] >= b

    def add(self, a: int, b: int) -> None:
        if b <= a:
            return
        i = bisect.bisect_left(self.ends, a)  # first interval that may touch [a, b)
        j = i
        while j < len(self.starts) and self.starts[j] <= b:
            a = min(a, self.starts[j])
            b = max(b, self.ends[j])
            j += 1
        self.starts[i:j] = [a]
        self.ends[i:j] = [b]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self.starts, self.ends, strict=True))

    def total(self, limit: int = INF) -> int:
        return sum(max(0, min(e, limit) - s) for s, e in self if s < limit)

    def __len__(self) -> int:
        return len(self.starts)


def _span(rec: Record) -> int:
    """Bytes a WRITE/FALLOCATE touches (a WRITE read back from the log has a length, no data)."""
    return rec.length if rec.op == Op.FALLOCATE or not rec.data else len(rec.data)


def _under(p: bytes, root: bytes) -> bool:
    return p == root or p.startswith(root + b"/")


@dataclass
class DirtyState:
    ranges: dict[bytes, RangeSet] = field(default_factory=dict)
    touched: set[bytes] = field(default_factory=set)
    renames: list[tuple[bytes, bytes]] = field(default_factory=list)
    lost: bool = False  # the log itself is unusable: a full resync is needed

    def covered(self, rec: Record) -> bool:
        if rec.op in (Op.WRITE, Op.FALLOCATE):
            rs = self.ranges.get(rec.path)
            return rs is not None and rs.covers(rec.offset, rec.offset + _span(rec))
        if rec.op == Op.TRUNCATE:
            rs = self.ranges.get(rec.path)
            return rs is not None and rs.covers(rec.offset, INF)
        if rec.op in NAMESPACE_OPS and rec.op not in (Op.RENAME, Op.LINK):
            return rec.path in self.touched
        return rec.op == Op.FSYNC

    def apply(self, rec: Record) -> None:
        if rec.op == Op.SETATTR and rec.flags == LOST_FLAG:
            self.lost = True
        elif rec.op in (Op.WRITE, Op.FALLOCATE):
            self.ranges.setdefault(rec.path, RangeSet()).add(rec.offset, rec.offset + _span(rec))
        elif rec.op == Op.TRUNCATE:
            self.ranges.setdefault(rec.path, RangeSet()).add(rec.offset, INF)
            self.touched.add(rec.path)
        elif rec.op == Op.RENAME:
            src, dst = rec.path, rec.path2
            self.renames.append((src, dst))
            moved = {p: r for p, r in self.ranges.items() if _under(p, src)}
            for p in [p for p in self.ranges if _under(p, dst)]:
                del self.ranges[p]
            for p, r in moved.items():
                # pop, not del: a rename into its own subtree (or onto itself, read back from
                # a crafted log) already dropped p with the ranges under dst.
                self.ranges.pop(p, None)
                self.ranges[dst + p[len(src) :]] = r
            self.touched.update((src, dst))
        elif rec.op in NAMESPACE_OPS:
            self.touched.add(rec.path)
            if rec.op == Op.LINK:
                self.touched.add(rec.path2)

    @property
    def empty(self) -> bool:
        return not (self.ranges or self.touched or self.renames or self.lost)

    def dirty_bytes(self) -> int:
        return sum(r.total() for r in self.ranges.values() if r.total() < INF // 2)

    def snapshot_records(self) -> list[Record]:
        out = [Record(0, Op.RENAME, s, path2=d) for s, d in self.renames]
        out += [Record(0, Op.SETATTR, p) for p in sorted(self.touched)]
        for p, rs in sorted(self.ranges.items()):
            for a, b in rs:
                if b >= INF:
                    out.append(Record(0, Op.TRUNCATE, p, offset=a))
                else:
                    out.append(Record(0, Op.WRITE, p, offset=a, length=b - a))
        if self.lost:
            out.append(Record(0, Op.SETATTR, b"", flags=LOST_FLAG))
        return out


class DirtyLog:
    """The durable dirty log of one replicated directory. Thread-safe (FUSE handlers may
    call ``sync`` from worker threads)."""

    def __init__(self, path: Path, compact_bytes: int = 8 << 20) -> None:
        self.path = path
        self.compact_bytes = compact_bytes
        self.state = DirtyState()
        self.rejected: dict[str, int] = {}
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._fd = -1
        self._written = 0
        self._synced = 0
        self._size = 0
        self._compacted = 0

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
    def note(self, rec: Record, eof: Callable[[], int | None] | None = None) -> int:
        """Record what ``rec`` changes, if not already recorded. Returns the log position
        that must be durable before the operation is performed (0: nothing to wait for).
        ``eof``: gives the file's size before a WRITE/FALLOCATE, when known (see
        APPEND_EXTENT); asked only when the write is not already covered."""
        with self._lock:
            if self.state.covered(rec):
                # Covered by a record maybe still on its way to disk (another operation's
                # fsync in progress): wait for it too, never perform the op before.
                return self._written if self._synced < self._written else 0
            if rec.op in (Op.WRITE, Op.FALLOCATE):
                end = rec.offset + _span(rec)
                size = eof() if eof is not None else None
                if size is not None and end >= size:
                    end = -(-end // APPEND_EXTENT) * APPEND_EXTENT
                entry = Record(0, rec.op, rec.path, offset=rec.offset, length=end - rec.offset)
            elif rec.op == Op.TRUNCATE:
                entry = Record(0, Op.TRUNCATE, rec.path, offset=rec.offset)
            elif rec.op in NAMESPACE_OPS:
                two = rec.op in (Op.RENAME, Op.LINK)
                entry = Record(0, rec.op, rec.path, path2=rec.path2 if two else b"")
            else:
                return 0
            self.state.apply(entry)
            self._append(record_frame(entry))
            return self._written

    def mark_lost(self) -> None:
        """The log cannot be trusted (e.g. I/O error): a full resync will be needed."""
        with self._lock:
            self.state.lost = True
            self._append(record_frame(Record(0, Op.SETATTR, b"", flags=LOST_FLAG)))

    def _append(self, frame: bytes) -> None:
        os.write(self._fd, frame)
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
            self.compact()

    def compact(self) -> None:
        with self._lock, self._sync_lock:
            tmp = self.path.with_suffix(".compact")
            blob = b"".join(record_frame(r) for r in self.state.snapshot_records())
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, blob)
                os.fsync(fd)
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
            self.state = DirtyState()
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.fsync(self._fd)
            self._size = 0
            self._synced = self._written

    def snapshot(self) -> DirtyState:
        """A copy of the current state: the work list of a resync. Entries stay in the log
        until ``clear()`` after the peer acknowledged the resync durably."""
        with self._lock:
            return _copy_state(self.state)

    @property
    def size(self) -> int:
        return self._size


def _copy_state(st: DirtyState) -> DirtyState:
    c = DirtyState(lost=st.lost)
    for r in st.snapshot_records():
        c.apply(r)
    return c


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
