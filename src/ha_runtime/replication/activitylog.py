"""The activity log of a primary in sync (DRBD's, at file-system granularity): before an
operation changes the backing directory, what it may change is durably "hot" there, so if
this node crashes with operations its peer never made durable, the peer, primary by then,
resyncs only the hot part of this copy instead of all of it. Entries (one record each):

- ``WRITE(path, offset=i*AL_EXTENT, length=AL_EXTENT)``: extent ``i`` of a file's bytes;
- ``TRUNCATE(path, offset)``: everything from ``offset`` on (size changes);
- ``SETATTR(path)``: metadata only (mode, owner, times, xattrs);
- ``UNLINK(path)``: the name itself (create, unlink, mkdir, rmdir, mknod, symlink, both
  names of link and rename): whatever is there, whole subtree included, may differ.

Only a new entry costs a record and an fsync (shared by concurrent ones: ``sync``). An
entry may be forgotten once every operation that used it is durable on the peer (its
``mark``, a link sequence number, is acknowledged); forgetting is lazy and in memory (the
record stays on disk until compaction): over-recording costs a little resync, never data.

``load_activity``, ``plan_to_wire``, ``plan_from_wire`` and ``merge_peer``: a returning
primary's activity (its activity and dirty logs) as the plan its peer resyncs.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ha_runtime.replication.dirtylog import INF, DirtyLog, DirtyState, RangeSet
from ha_runtime.replication.journal import NAMESPACE_OPS, Op, Record, record_frame
from ha_runtime.replication.recordlog import LOST_FLAG, RecordLog, read_state

log = logging.getLogger("hapair.replication")

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


class ActivityLog(RecordLog[ActivityState]):
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
    al, why = read_state(al_path, ActivityState())
    if al is None:
        return None, f"its activity log {why}"
    if al.lost:
        return None, "its activity log is damaged"
    if al.overflow:
        return None, "its activity log overflowed"
    dirty, why = read_state(dirty_path, DirtyState())
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
