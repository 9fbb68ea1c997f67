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
MAC and dropped (its operation had not been performed); loading and compaction are
``recordlog``'s.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ha_runtime.replication.journal import NAMESPACE_OPS, Op, Record, record_frame
from ha_runtime.replication.recordlog import LOST_FLAG, RecordLog

log = logging.getLogger("hapair.replication")

INF = 1 << 62
SCOPE_FLAG = 0xFFFFFFFD  # UNLINK(path, flags=SCOPE_FLAG): reconcile its whole subtree
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
    # Paths whose whole subtree the peer may hold in any state (from an activity log: names
    # an operation changed that the peer may or may not have seen); reconciled by a checksum
    # delta over them.
    scope: set[bytes] = field(default_factory=set)

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
        elif rec.op == Op.UNLINK and rec.flags == SCOPE_FLAG:
            self.scope.add(rec.path)
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
        return not (self.ranges or self.touched or self.renames or self.scope or self.lost)

    def dirty_bytes(self) -> int:
        return sum(r.total() for r in self.ranges.values() if r.total() < INF // 2)

    def snapshot_records(self) -> list[Record]:
        out = [Record(0, Op.RENAME, s, path2=d) for s, d in self.renames]
        out += [Record(0, Op.SETATTR, p) for p in sorted(self.touched)]
        out += [Record(0, Op.UNLINK, p, flags=SCOPE_FLAG) for p in sorted(self.scope)]
        for p, rs in sorted(self.ranges.items()):
            for a, b in rs:
                if b >= INF:
                    out.append(Record(0, Op.TRUNCATE, p, offset=a))
                else:
                    out.append(Record(0, Op.WRITE, p, offset=a, length=b - a))
        if self.lost:
            out.append(Record(0, Op.SETATTR, b"", flags=LOST_FLAG))
        return out


class DirtyLog(RecordLog[DirtyState]):
    """The durable dirty log of one replicated directory."""

    # What was noted since the resync began (``snapshot(watch=True)``), in memory only.
    _watch = DirtyState()
    _watching = False

    def _new_state(self) -> DirtyState:
        return DirtyState()

    def note(self, rec: Record, eof: Callable[[], int | None] | None = None) -> int:
        """Record what ``rec`` changes, if not already recorded. Returns the log position
        that must be durable before the operation is performed (0: nothing to wait for).
        ``eof``: gives the file's size before a WRITE/FALLOCATE, when known (see
        APPEND_EXTENT); asked only when the write is not already covered."""
        with self._lock:
            if self._watching:
                _watch_note(self._watch, rec)
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

    def note_scope(self, path: bytes) -> None:
        """The peer may hold ``path`` (and anything under it) in any state."""
        with self._lock:
            if path not in self.state.scope:
                self.state.scope.add(path)
                self._append(record_frame(Record(0, Op.UNLINK, path, flags=SCOPE_FLAG)))

    def snapshot(self, watch: bool = False) -> DirtyState:
        """A copy of the current state: the work list of a resync. Entries stay in the log
        until ``clear()`` after the peer acknowledged the resync durably. ``watch``: from
        this moment on, also gather every change noted (``take_watch``)."""
        with self._lock:
            if watch:
                self._watch, self._watching = DirtyState(), True
            return _copy_state(self.state)

    def take_watch(self) -> DirtyState:
        """What was noted since ``snapshot(watch=True)`` or the previous call, recorded before
        or not: the changes the application made while a resync worked."""
        with self._lock:
            taken, self._watch = self._watch, DirtyState()
            return taken

    def end_watch(self) -> None:
        with self._lock:
            self._watch, self._watching = DirtyState(), False


def _watch_note(w: DirtyState, rec: Record) -> None:
    """Gather a change noted while a resync works, exactly (no look-ahead, covered or not).
    A rename or link puts both names in scope: the peer applied it in stream order, and its
    copy of the source may not be ours yet (``resync.settle``)."""
    if rec.op in (Op.WRITE, Op.FALLOCATE):
        w.apply(Record(0, rec.op, rec.path, offset=rec.offset, length=_span(rec)))
    elif rec.op == Op.TRUNCATE:
        w.apply(Record(0, Op.TRUNCATE, rec.path, offset=rec.offset))
    elif rec.op in (Op.RENAME, Op.LINK):
        w.scope |= {rec.path, rec.path2}
        w.touched |= {rec.path, rec.path2}
    elif rec.op in NAMESPACE_OPS:
        w.apply(Record(0, rec.op, rec.path))


def _copy_state(st: DirtyState) -> DirtyState:
    c = DirtyState(lost=st.lost)
    for r in st.snapshot_records():
        c.apply(r)
    return c
