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
import contextlib
import errno
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from ha_runtime.replication.journal import NAMESPACE_OPS, Op, Record, read_records, record_frame

log = logging.getLogger("hapair.replication")

INF = 1 << 62
LOST_FLAG = 0xFFFFFFFF  # SETATTR(b"", flags=LOST_FLAG): the log is not trustworthy
SCOPE_FLAG = 0xFFFFFFFD  # UNLINK(path, flags=SCOPE_FLAG): reconcile its whole subtree
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


class _LogState(Protocol):
    lost: bool

    def apply(self, rec: Record) -> None: ...
    def snapshot_records(self) -> list[Record]: ...


S = TypeVar("S", bound=_LogState)


def _write_all(fd: int, data: bytes) -> None:
    """One write of a whole frame; a short one (the disk filling up) is an error."""
    if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, "short write to a log file")


class _RecordLog(Generic[S]):
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


class DirtyLog(_RecordLog[DirtyState]):
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


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- activity log
#
# The activity log of a primary in sync (DRBD's, at file-system granularity): before an
# operation changes the backing directory, what it may change is durably "hot" there, so if
# this node crashes with operations its peer never made durable, the peer, primary by then,
# resyncs only the hot part of this copy instead of all of it. Entries (one record each):
#
# - ``WRITE(path, offset=i*AL_EXTENT, length=AL_EXTENT)``: extent ``i`` of a file's bytes;
# - ``TRUNCATE(path, offset)``: everything from ``offset`` on (size changes);
# - ``SETATTR(path)``: metadata only (mode, owner, times, xattrs);
# - ``UNLINK(path)``: the name itself (create, unlink, mkdir, rmdir, mknod, symlink, both
#   names of link and rename): whatever is there, whole subtree included, may differ.
#
# Only a new entry costs a record and an fsync (shared by concurrent ones: ``sync``). An
# entry may be forgotten once every operation that used it is durable on the peer (its
# ``mark``, a link sequence number, is acknowledged); forgetting is lazy and in memory (the
# record stays on disk until compaction): over-recording costs a little resync, never data.

AL_EXTENT = 4 << 20
AL_EXTENTS = 1024  # hot entries kept (forgotten least recently used first, once acked)
AL_OVERFLOW_FACTOR = 16  # more unacknowledged entries than this x the bound: give up
# An entry acknowledged and unused this long is dropped from the file (trim): what a crash
# leaves hot is then what was in use lately, not the last AL_EXTENTS entries ever used
# (4 GiB of extents, or whole files and trees for names and truncates).
AL_IDLE_S = 2.0
# A stream (a run of contiguous writes of at least one extent) entering a new extent makes
# as many more extents ahead hot as it has written, up to AL_AHEAD, with the same fsync: a
# 256 MiB file written 1 MiB at a time paid 64 fsyncs, now 8. Ahead of the end of file they
# cost nothing after a crash (a resync clips ranges to the size); inside it, never more than
# the stream already wrote. Writes that merely touch (adjacent pages) are no stream: the
# lab's crash test saw 60 MiB more resynced when any contiguous write looked ahead.
AL_AHEAD = 15
OVERFLOW_FLAG = 0xFFFFFFFE  # SETATTR(b"", flags=OVERFLOW_FLAG): recording stopped
WHOLE, TAIL, META = -1, -2, -3  # entry kinds beside extent numbers >= 0
PINNED = INF  # an operation is between note() and release(): never forgotten

Key = tuple[bytes, int]


@dataclass
class _Hot:
    pos: int  # log position of its record: durable once synced up to it
    mark: int = 0  # link seq that must be durable on the peer before it is forgotten
    pins: int = 0  # operations between note() and release()
    offset: int = 0  # TAIL: lowest size truncated to
    used: float = 0.0  # time.monotonic() of its last use


def al_keys(rec: Record) -> list[tuple[Key, int]]:
    """The entries an operation uses: (key, offset for a TAIL)."""
    op = rec.op
    if op is Op.WRITE or op is Op.FALLOCATE:  # the hot path: identity, not enum equality
        n = rec.length if op is Op.FALLOCATE or not rec.data else len(rec.data)
        if n <= 0:
            return []
        first, last = rec.offset // AL_EXTENT, (rec.offset + n - 1) // AL_EXTENT
        if first == last:
            return [((rec.path, first), 0)]
        return [((rec.path, i), 0) for i in range(first, last + 1)]
    if rec.op == Op.TRUNCATE:
        return [((rec.path, TAIL), rec.offset)]
    if rec.op in (Op.SETATTR, Op.SETXATTR, Op.REMOVEXATTR):
        return [((rec.path, META), 0)]
    if rec.op in (Op.RENAME, Op.LINK):
        return [((rec.path, WHOLE), 0), ((rec.path2, WHOLE), 0)]
    if rec.op in NAMESPACE_OPS:
        return [((rec.path, WHOLE), 0)]
    return []


def _al_record(key: Key, h: _Hot) -> Record:
    path, kind = key
    if kind == TAIL:
        return Record(0, Op.TRUNCATE, path, offset=h.offset)
    if kind == META:
        return Record(0, Op.SETATTR, path)
    if kind == WHOLE:
        return Record(0, Op.UNLINK, path)
    return Record(0, Op.WRITE, path, offset=kind * AL_EXTENT, length=AL_EXTENT)


@dataclass
class ActivityState:
    hot: OrderedDict[Key, _Hot] = field(default_factory=OrderedDict)  # oldest use first
    lost: bool = False  # unreadable: the peer needs a full resync
    overflow: bool = False  # too many unacknowledged entries: recording stopped

    def apply(self, rec: Record) -> None:
        """Fold one record read back from the log."""
        if rec.op == Op.SETATTR and rec.path == b"" and rec.flags == LOST_FLAG:
            self.lost = True
        elif rec.op == Op.SETATTR and rec.path == b"" and rec.flags == OVERFLOW_FLAG:
            self.overflow = True
        else:
            for key, off in al_keys(rec):
                h = self.hot.get(key)
                if h is None:
                    self.hot[key] = _Hot(0, offset=off)
                else:
                    h.offset = min(h.offset, off)

    def snapshot_records(self) -> list[Record]:
        out = [_al_record(k, h) for k, h in self.hot.items()]
        if self.overflow:
            out.append(Record(0, Op.SETATTR, b"", flags=OVERFLOW_FLAG))
        if self.lost:
            out.append(Record(0, Op.SETATTR, b"", flags=LOST_FLAG))
        return out


class ActivityLog(_RecordLog[ActivityState]):
    """The activity log of one replicated directory (see above)."""

    def __init__(self, path: Path, extents: int = AL_EXTENTS, compact_bytes: int = 1 << 20) -> None:
        super().__init__(path, compact_bytes)
        self.extents = extents
        self._runs: dict[bytes, tuple[int, int]] = {}  # each file's run of contiguous writes

    def _new_state(self) -> ActivityState:
        return ActivityState()

    def note(self, rec: Record, acked: int) -> int:
        """Make the entries ``rec`` uses hot and pin them until ``release``. Returns the log
        position that must be durable before the operation is performed (0: already is).
        ``acked``: the link's sequence number the peer made durable (entries whose mark it
        reached may be forgotten to keep the bound)."""
        keys = al_keys(rec)
        if not keys:
            return 0
        now = time.monotonic()
        with self._lock:
            st = self.state
            if st.overflow or st.lost:
                return 0
            wait = 0
            new = False
            pinned: list[_Hot] = []
            for key, off in keys:
                h = st.hot.get(key)
                if h is None or (key[1] == TAIL and off < h.offset):
                    created, old_offset = h is None, 0 if h is None else h.offset
                    if h is None:
                        h = st.hot[key] = _Hot(0, offset=off)
                    h.offset = off
                    try:
                        self._record_entry(key, h)
                    except OSError:
                        # Not recorded: nothing may look recorded, and the operation must
                        # not happen (its caller gets the error, e.g. ENOSPC).
                        if created:
                            del st.hot[key]
                        else:
                            h.offset = old_offset
                        for p in pinned:
                            p.pins -= 1
                        raise
                    new = True
                else:
                    st.hot.move_to_end(key)
                h.pins += 1
                pinned.append(h)
                h.used = now
                wait = max(wait, h.pos)
            ahead = min(AL_AHEAD, self._run_length(rec) // AL_EXTENT)
            if ahead and new:
                self._mark_ahead(rec, ahead, now)
                wait = self._written  # one fsync for the op's entry and those ahead
            if new:
                self._forget(acked)
                if len(st.hot) > self.extents * AL_OVERFLOW_FACTOR:
                    st.overflow = True
                    self._append(record_frame(Record(0, Op.SETATTR, b"", flags=OVERFLOW_FLAG)))
                    wait = self._written
            return wait if wait > self._synced else 0

    def _run_length(self, rec: Record) -> int:
        """Bytes written contiguously up to the end of ``rec`` (its file's current run)."""
        if rec.op is not Op.WRITE or not rec.data:
            return 0
        runs = self._runs
        start, end = runs.get(rec.path, (-1, -1))
        if end != rec.offset:
            start = rec.offset
            if len(runs) >= 4096 and rec.path not in runs:
                runs.clear()  # a bound: only streams in progress matter
        end = rec.offset + len(rec.data)
        runs[rec.path] = (start, end)
        return end - start

    def _mark_ahead(self, rec: Record, ahead: int, now: float) -> None:
        """Make ``ahead`` extents after ``rec``'s last one hot (not pinned: nobody uses
        them yet). Best effort: a failed append only stops the look-ahead."""
        hot = self.state.hot
        last = (rec.offset + len(rec.data) - 1) // AL_EXTENT
        for i in range(last + 1, last + 1 + ahead):
            key = (rec.path, i)
            if key in hot:
                continue
            h = _Hot(0, used=now)
            try:
                self._record_entry(key, h)
            except OSError:
                return
            hot[key] = h

    def _record_entry(self, key: Key, h: _Hot) -> None:
        """Append the entry's record; it is durable once the log is synced to ``h.pos``."""
        self._append(record_frame(_al_record(key, h)))
        h.pos = self._written

    def release(self, rec: Record, mark: int) -> None:
        """The operation is about to be performed and will travel as ``mark`` (or earlier)."""
        with self._lock:
            for key, _ in al_keys(rec):
                h = self.state.hot.get(key)
                if h is not None and h.pins:
                    h.pins -= 1
                    h.mark = max(h.mark, mark)

    def link_changed(self) -> None:
        """The link was lost: every operation it did not acknowledge is in the dirty log,
        and sequence numbers start again on the next link; nothing here waits for acks."""
        with self._lock:
            for h in self.state.hot.values():
                h.mark = 0

    def trim(self, acked: int, idle: float = AL_IDLE_S) -> int:
        """Drop the entries acknowledged (``acked``) and unused for ``idle`` seconds, and
        rewrite the file without them (compaction: off the operations' path, though they
        wait for its lock meanwhile). Returns how many went."""
        now = time.monotonic()
        with self._lock:
            hot = self.state.hot
            cold = [
                k for k, h in hot.items() if not h.pins and h.mark <= acked and now - h.used >= idle
            ]
            for k in cold:
                del hot[k]
            stale = self._size > 2 * max(self._compacted, 4096)
        if cold or stale:
            self.compact()
        return len(cold)

    def _forget(self, acked: int) -> None:
        hot = self.state.hot
        excess = len(hot) - self.extents
        if excess <= 0:
            return
        for key in list(itertools.islice(hot, excess + 64)):
            h = hot[key]
            if not h.pins and h.mark <= acked:
                del hot[key]
                excess -= 1
                if not excess:
                    return

    def entries(self) -> int:
        return len(self.state.hot)

    def fold_into(self, dirty: DirtyLog) -> bool:
        """A primary starting: what a past run here left hot may be missing on the peer
        (that run crashed in sync, or the peer never took over): record it in the dirty log
        (durably), then forget it here. True if there was anything."""
        st = self.state
        if not (st.hot or st.lost or st.overflow):
            return False
        if st.lost or st.overflow:
            dirty.mark_lost()
        for (path, kind), h in st.hot.items():
            if kind == WHOLE:
                dirty.note_scope(path)
            else:
                dirty.note(_al_record((path, kind), h))
        dirty.sync()
        self.clear()
        return True


def load_activity(al_path: Path, dirty_path: Path) -> tuple[DirtyState | None, str]:
    """What a node that was primary may hold that its peer lacks (read-only, the logs of a
    past primary run): the union of its activity log and its dirty log as a resync plan
    (ranges, metadata-only paths in ``touched``, whole paths in ``scope``), or None and why
    it cannot be trusted."""
    al, why = _read_state(al_path, ActivityState())
    if al is None:
        return None, f"its activity log {why}"
    if al.lost:
        return None, "its activity log is damaged"
    if al.overflow:
        return None, "its activity log overflowed"
    dirty, why = _read_state(dirty_path, DirtyState())
    if dirty is None or dirty.lost:
        return None, f"its dirty log {why or 'is lost'}"
    plan = DirtyState()
    for (path, kind), h in al.hot.items():
        if kind == WHOLE:
            plan.scope.add(path)
        elif kind == META:
            plan.touched.add(path)
        else:
            a, b = (h.offset, INF) if kind == TAIL else (kind * AL_EXTENT, (kind + 1) * AL_EXTENT)
            plan.ranges.setdefault(path, RangeSet()).add(a, b)
            plan.touched.add(path)
    for path, rs in dirty.ranges.items():
        for a, b in rs:
            plan.ranges.setdefault(path, RangeSet()).add(a, b)
        plan.touched.add(path)
    plan.scope |= dirty.touched | dirty.scope
    for s, d in dirty.renames:
        plan.scope |= {s, d}
    return plan, ""


def _read_state(path: Path, state: S) -> tuple[S | None, str]:
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


def plan_to_wire(plan: DirtyState | None, why: str) -> dict[str, object]:
    """The HELLO's ``activity``: a returning primary's plan (paths as ``os.fsdecode``)."""
    if plan is None:
        return {"state": "unusable", "why": why}
    return {
        "state": "intact",
        "ranges": [
            [os.fsdecode(p), a, -1 if b >= INF else b]
            for p, rs in sorted(plan.ranges.items())
            for a, b in rs
        ],
        "touched": [os.fsdecode(p) for p in sorted(plan.touched)],
        "scope": [os.fsdecode(p) for p in sorted(plan.scope)],
    }


def plan_from_wire(raw: object, valid: Callable[[bytes], bool]) -> tuple[DirtyState | None, str]:
    """Parse the peer's ``activity``; (None, why) when absent, unusable or malformed."""
    if not isinstance(raw, dict):
        return None, "it sent no activity log (an older runtime)"
    if raw.get("state") != "intact":
        return None, str(raw.get("why") or "its activity log is unusable")
    plan = DirtyState()

    def path(x: object) -> bytes:
        if not isinstance(x, str):
            raise TypeError(x)
        p = os.fsencode(x)
        if p and not valid(p):
            raise ValueError(x)
        return p

    def offset(x: object) -> int:
        if not isinstance(x, int) or isinstance(x, bool):
            raise TypeError(x)
        return x

    try:
        for p, a, b in raw.get("ranges", []):
            end = offset(b)
            plan.ranges.setdefault(path(p), RangeSet()).add(
                max(0, offset(a)), INF if end < 0 else end
            )
        plan.touched = {path(p) for p in raw.get("touched", [])}
        plan.scope = {path(p) for p in raw.get("scope", [])}
    except (TypeError, ValueError):
        return None, "its activity log report is malformed"
    return plan, ""


def merge_peer(state: DirtyState, peer: DirtyState) -> None:
    """Add a returning primary's plan to ours (``resync.incremental`` reconciles).

    Its extents and tails say where its copy may differ from ours, not that it does: most
    of what it wrote there reached us before it went (a 64 MiB file written and fsync'd just
    before a crash is hot all over, and identical here). Sent as ranges, all of it traveled
    again (80 MiB for 16 MiB changed since). Those files get a checksum delta instead
    (``scope``): only the blocks that differ travel, our own ranges in them included."""
    state.scope |= set(peer.ranges) | peer.scope
    state.touched |= peer.touched - set(peer.ranges)
