"""Resynchronisation of a returning secondary, and verification.

- **Incremental** (``incremental``): the primary replays the recorded renames, then for each
  recorded path reconciles existence, type, metadata and size and sends exactly the dirty
  byte ranges, read from the backing file at send time. Live writes keep flowing on the same
  ordered stream meanwhile: a chunk is read and queued with no scheduling point in between,
  so a later live write to the same bytes always lands after it.
- **Full** (``full``): when the divergence is unknown, the secondary lists its tree; every
  primary file whose size or mtime differs (or every file, with ``checksum=True``) travels as
  an rsync delta against the secondary's copy (signature requested from the secondary);
  paths the primary does not have are removed. With ``quarantine=True`` (split brain) the
  secondary first moves every file it is about to change or remove into its quarantine.
- **Verify** (``tree.tree_digests``): SHA-256 per regular file, link targets, directory entries;
  the primary compares both sides.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ha_runtime.replication import beneath
from ha_runtime.replication import delta as D
from ha_runtime.replication.dirtylog import INF, DirtyState, RangeSet
from ha_runtime.replication.journal import (
    DELTA_CONT,
    DELTA_IN_PLACE,
    DELTA_MORE,
    SET_ATIME,
    SET_GID,
    SET_MODE,
    SET_MTIME,
    SET_UID,
    Op,
    Record,
)
from ha_runtime.replication.link.framing import LinkLost
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.tree import list_tree

log = logging.getLogger("hapair.replication")

CHUNK = 1 << 20
# Unacknowledged resync bytes at most (the link allows 64 MiB, for bursts of live writes).
# The secondary answers keepalives in stream order: behind tens of MiB of resync data its
# answer came later than the link timeout (lab: 1 s), the link dropped and the resync began
# again from the start (the lab's 5 % case sent 1.45x the changed bytes). A few MiB ahead
# keep it busy and its answers prompt. Every half window the resync queues a keepalive of
# its own, whose answer acknowledges receipt of what came before it (a secondary acks by
# count otherwise: 256 records, far more than the window holds of 1 MiB chunks).
RESYNC_WINDOW = 8 << 20
DELTA_PIECE = 4 << 20  # well under the 16 MiB frame limit
DELTA_PIECE_OUTPUT = 32 << 20  # a piece rebuilds at most this: applied well within a timeout
REMOVE_ANY = 1  # UNLINK flag: remove whatever is there (file or tree)
SMALL_FILE = 64 << 10
# Passes over what the application changed while the resync worked on it (see ``settle``):
# one that needs no delta ends it; past this many, the session is a link failure.
SETTLE_ROUNDS = 8


@dataclass
class Progress:
    kind: str = "incremental"
    bytes_total: int = 0
    bytes_done: int = 0
    files_done: int = 0
    started: float = field(default_factory=time.monotonic)
    pinged_seq: int = 0  # last record sent before the resync's latest keepalive
    queued_s: float | None = None  # when everything was queued (the rest: the final barrier)
    # Paths that could not be read or listed here (not gone: an error other than "no such
    # file"); reconciled again by the next round of ``settle``.
    retry: set[bytes] = field(default_factory=set)
    # Paths the pass has yet to reconcile (``all_pending``: every path, a delta over the
    # tree in progress). The application's operations on them are held back (``hold``):
    # the peer may lack them yet (a WRITE to a file it does not have fails there, the link
    # dropped and every reconnection repeated it).
    pending: set[bytes] = field(default_factory=set)
    all_pending: bool = False
    # Directories above pending paths, with how many pending paths each holds (an rmdir or
    # a rename of one is held back too).
    above: dict[bytes, int] = field(default_factory=dict)
    # Paths of operations held back that this pass will not reconcile: the next round will.
    leftover: set[bytes] = field(default_factory=set)
    # What the operations held back changed, by path: the path's reconciliation sends it.
    held: dict[bytes, RangeSet] = field(default_factory=dict)
    # Files whose ranges are on their way: a rename or link of one (or of a directory above)
    # is held back too, or the rest of its ranges would go to the old name.
    sending: set[bytes] = field(default_factory=set)

    @property
    def bytes_left(self) -> int:
        return max(0, self.bytes_total - self.bytes_done)

    @property
    def rate_bps(self) -> float:
        dt = time.monotonic() - self.started
        return self.bytes_done / dt if dt > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        r = self.rate_bps
        return self.bytes_left / r if r > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "bytes_done": self.bytes_done,
            "bytes_left": self.bytes_left,
            "rate_bps": round(self.rate_bps),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "files_done": self.files_done,
            "queued_s": None if self.queued_s is None else round(self.queued_s, 3),
        }


def hold(progress: Progress, rec: Record) -> bool:
    """True: do not ship the application's operation ``rec`` now (it is in the dirty log,
    and among the changes ``settle`` gathers); a path of it, or a directory above one, is
    still to be reconciled by this pass, which then reads it as it is. Its paths are held
    until reconciled, and those the pass will not reach are left to the next round."""
    moves = rec.op in (Op.RENAME, Op.LINK)
    names = (rec.path, rec.path2) if moves else (rec.path,)
    moving = moves and any(_in_scope(f, set(names)) for f in progress.sending)
    if not (
        progress.all_pending
        or moving
        or any(_in_scope(p, progress.pending) or p in progress.above for p in names)
    ):
        return False
    for p in names:
        if not progress.all_pending:
            _pend(progress, p)
        progress.leftover.add(p)
    if moves or rec.op in _TYPE_OPS:
        # The peer's copy of the names moved is unknown now, or what is there may be of
        # another type than ours (a directory replaced by a file): listed and compared by
        # a checksum delta, whole subtrees, next round (a reconciliation by name assumes
        # the peer holds the same kind of thing).
        progress.retry |= set(names)
    rs = progress.held.setdefault(rec.path, RangeSet())
    if rec.op in (Op.WRITE, Op.FALLOCATE):
        rs.add(rec.offset, rec.offset + (rec.length if rec.op == Op.FALLOCATE else len(rec.data)))
    elif rec.op == Op.TRUNCATE:
        rs.add(rec.offset, INF)
    return True


_TYPE_OPS = frozenset({Op.CREATE, Op.MKNOD, Op.MKDIR, Op.SYMLINK, Op.UNLINK, Op.RMDIR})


def _ancestors(p: bytes) -> Iterator[bytes]:
    while b"/" in p:
        p = p.rpartition(b"/")[0]
        yield p


def _pend(progress: Progress, p: bytes) -> None:
    if p not in progress.pending:
        progress.pending.add(p)
        for a in _ancestors(p):
            progress.above[a] = progress.above.get(a, 0) + 1


def _pend_all(progress: Progress, paths: Iterable[bytes]) -> None:
    progress.pending, progress.above = set(), {}
    for p in paths:
        _pend(progress, p)


def _reconciled(progress: Progress, rel: bytes) -> None:
    """``rel`` is read as it is now: what was held back for it is included."""
    progress.leftover.discard(rel)
    _unpend(progress, rel)


def _unpend(progress: Progress, rel: bytes) -> None:
    if rel in progress.pending:
        progress.pending.discard(rel)
        for a in _ancestors(rel):
            n = progress.above.get(a, 0) - 1
            if n > 0:
                progress.above[a] = n
            else:
                progress.above.pop(a, None)


def _abs(root: Path, rel: bytes) -> bytes:
    return os.fsencode(root) + (b"/" + rel if rel else b"")


def _meta_records(rel: bytes, st: os.stat_result) -> list[Record]:
    flags = SET_UID | SET_GID | SET_ATIME | SET_MTIME
    if not stat.S_ISLNK(st.st_mode):
        flags |= SET_MODE
    return [
        Record(
            0, Op.SETATTR, rel, flags=flags, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
            atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns,
        )
    ]  # fmt: skip


async def _room(link: PrimaryLink, progress: Progress) -> None:
    """Backpressure of a resync: the link's own limit, then RESYNC_WINDOW. TooSlowError
    when no acknowledgement at all came for a whole timeout (as ``PrimaryLink.room``)."""
    await link.room()
    st = link.stats()
    if st.inflight_bytes > RESYNC_WINDOW // 2 and st.received_seq >= progress.pinged_seq:
        link.ping()  # the previous one was answered: ask for the next receipt ack
        progress.pinged_seq = st.last_seq
    await link.wait_progress(lambda: link.stats().inflight_bytes <= RESYNC_WINDOW)


async def _send_ranges(
    link: PrimaryLink, root: Path, rel: bytes, ranges: list[tuple[int, int]], progress: Progress
) -> None:
    """Queue WRITE records for the ranges (clipped to the current size), chunk by chunk.
    Each chunk is read and queued only while ``rel`` still names the file opened: renamed,
    removed or replaced meanwhile, the rest of the file is left to its new name (the
    application's operation is in the stream, and ``settle`` reconciles where it went)."""
    path = _abs(root, rel)
    try:
        fd = beneath.open_file(path)  # O_NONBLOCK: a FIFO here never waits
    except OSError as e:
        # EINVAL: not a regular file anymore (its own op is in the stream, as for gone)
        if not _absent(e) and e.errno != errno.EINVAL:
            progress.retry.add(rel)
        return  # gone or not a file anymore: its own op is in the stream
    progress.sending.add(rel)
    try:
        st0 = os.fstat(fd)
        if not stat.S_ISREG(st0.st_mode):
            return
        for a, b in ranges:
            off = a
            while True:
                await _room(link, progress)
                # read + queue without a checkpoint in between (ordering with live writes)
                try:
                    now = os.stat(path, follow_symlinks=False)
                except OSError:
                    return
                if (now.st_dev, now.st_ino) != (st0.st_dev, st0.st_ino):
                    return
                size = os.fstat(fd).st_size
                end = min(b, size, off + CHUNK)
                if off >= end:
                    break
                data = os.pread(fd, end - off, off)
                if not data:
                    break
                link.submit(Record(0, Op.WRITE, rel, offset=off, data=data))
                progress.bytes_done += len(data)
                off += len(data)
                await trio.lowlevel.checkpoint()
    finally:
        progress.sending.discard(rel)
        os.close(fd)


def _absent(e: OSError) -> bool:
    """The path names nothing here: it, or a directory on its way, is gone or replaced."""
    return e.errno in (errno.ENOENT, errno.ENOTDIR)


def _in_scope(p: bytes, scope: set[bytes]) -> bool:
    """``p`` is one of ``scope`` or under one of them."""
    while True:
        if p in scope:
            return True
        if b"/" not in p:
            return False
        p = p.rpartition(b"/")[0]


def _bytes_to_send(root: Path, state: DirtyState) -> int:
    """The dirty bytes within the files' sizes: the log records appends up to the next
    APPEND_EXTENT, which never travels (progress and ETA would count 4 MiB per new file)."""
    total = 0
    for rel, rs in state.ranges.items():
        try:
            total += rs.total(os.lstat(_abs(root, rel)).st_size)
        except OSError:
            continue
    return total


async def run(
    link: PrimaryLink, root: Path, state: DirtyState, progress: Progress, *, full: bool,
    changes: Callable[[], DirtyState], quarantine: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> None:  # fmt: skip
    """A resync: the full checksum delta or the incremental pass over ``state``, then
    ``settle`` over what the application changed that the pass held back. ``changes()``
    returns what was noted since the previous call (the first: since ``state`` was
    taken)."""
    try:
        if full:
            progress.all_pending = True
            try:
                await full_delta(link, root, progress, checksum=True, quarantine=quarantine,
                                 on_progress=on_progress)  # fmt: skip
            finally:
                progress.all_pending = False
        else:
            await incremental(link, root, state, progress, on_progress)
        await settle(link, root, progress, changes, on_progress=on_progress)
    finally:
        _pend_all(progress, ())
        progress.all_pending = False
        progress.held = {}


async def settle(
    link: PrimaryLink, root: Path, progress: Progress, changes: Callable[[], DirtyState], *,
    on_progress: Callable[[Progress], None] | None = None,
) -> None:  # fmt: skip
    """Reconcile what the application changed while the pass could not ship it.

    The application's operations on paths the pass had yet to reconcile were held back
    (``hold``): the peer might lack them, and a delta is not atomic (the file is read, the
    pieces travel later). Those the pass reconciled afterwards were read as they were then;
    the others (``leftover``), and paths that could not be read (``retry``), are reconciled
    here from the changes noted meanwhile: names renamed, linked or changed in type are
    sent again whole (``_resend``: whatever the peer holds there goes; no delta, whose
    listing and signatures would keep them held back long enough for a busy application
    to touch them again, round after round), the rest as an incremental pass does.
    Operations shipped live followed the peer's copy in order, and need nothing more. Until
    a round leaves nothing behind; past SETTLE_ROUNDS, a link failure (the session starts
    over)."""
    for _ in range(SETTLE_ROUNDS):
        live = changes()
        retry, held = progress.retry, progress.leftover | progress.retry
        progress.retry = set()
        progress.leftover = set()
        if not held:
            return
        moved = {p for p in live.scope if p in held}
        for src, dst in live.renames:
            if src in held or dst in held:
                moved |= {src, dst}
        # sent again whole: moved names, what could not be read or whose delta was left
        whole = moved | retry | _unnoted(held, live)
        whole = {p for p in whole if not any(_in_scope(a, whole) for a in _ancestors(p))}
        work = DirtyState(touched={p for p in held if not _in_scope(p, whole)})
        work.ranges = {p: r for p, r in live.ranges.items() if p in work.touched}
        _pend_all(progress, work.touched | whole)
        await _reconcile_paths(link, root, work, progress, on_progress)
        for rel in sorted(whole, key=lambda p: (p.count(b"/"), p)):
            await _room(link, progress)
            await _resend(link, root, rel, progress)
    reason = (
        f"resync: the application kept renaming or the tree kept failing to read after "
        f"{SETTLE_ROUNDS} rounds ({sorted(progress.retry | progress.leftover)[:5]!r})"
    )
    link.fail(reason)  # a link failure: the session starts over after a backoff
    raise LinkLost(reason)


def _unnoted(held: set[bytes], live: DirtyState) -> set[bytes]:
    """Held paths with no change noted for them (a path that could not be read, or whose
    delta was abandoned): a checksum delta reads them again whole."""
    return {p for p in held if p not in live.touched and p not in live.ranges}


async def incremental(
    link: PrimaryLink, root: Path, state: DirtyState, progress: Progress,
    on_progress: Callable[[Progress], None] | None = None,
) -> bool:  # fmt: skip
    """Send exactly what ``state`` records. Paths in ``state.scope`` (a returning primary's
    names, in whatever state its copy left them) first get a checksum delta over their
    subtrees, then the recorded ranges and paths travel. True if a delta was made (what
    changed meanwhile must be settled)."""
    if progress.kind != "full":
        progress.kind = "incremental"
    _pend_all(progress, state.touched | set(state.ranges) | state.scope)
    if state.renames and not state.scope:
        await _replay_renames(link, state)
    if b"" in state.scope:  # the root is never replaced: its metadata is reconciled
        state.scope.discard(b"")
        state.touched.add(b"")
    for p in state.scope:  # renames not replayed: their names are read whole
        _pend(progress, p)
    delta = bool(state.scope)
    if delta:
        # The peer's copy may differ from the one our renames were recorded against (names
        # in scope): replaying one there could fail or misplace; both names are reconciled
        # whole instead.
        for src, dst in state.renames:
            state.scope |= {src, dst}
        state.renames = []
        # Directories above the scope that changed here (made while the peer was away)
        # first: the delta's CREATE of a file in one the peer lacks failed there.
        ups = {a for p in state.scope for a in _ancestors(p)} & state.touched
        for a in sorted(ups, key=lambda p: (p.count(b"/"), p)):
            await _reconcile_path(link, root, a, state, progress)
            state.touched.discard(a)
        await full_delta(link, root, progress, checksum=True, scope=state.scope,
                         on_progress=on_progress)  # fmt: skip
        for p in list(state.scope):
            _unpend(progress, p)
        # (what was held meanwhile is left over: the next round)
        # The delta made every file under the scope equal to ours as it read it: their
        # ranges need not travel again (changes since are ``settle``'s).
        for p in [p for p in state.ranges if _in_scope(p, state.scope)]:
            del state.ranges[p]
        state.touched = {p for p in state.touched if not _in_scope(p, state.scope)}
    await _reconcile_paths(link, root, state, progress, on_progress)
    progress.queued_s = time.monotonic() - progress.started
    return delta


async def _reconcile_paths(
    link: PrimaryLink, root: Path, state: DirtyState, progress: Progress,
    on_progress: Callable[[Progress], None] | None,
) -> None:  # fmt: skip
    progress.bytes_total = progress.bytes_done + _bytes_to_send(root, state)
    paths = sorted(state.touched | set(state.ranges), key=lambda p: (p.count(b"/"), p))
    last = time.monotonic()
    for rel in paths:
        await _room(link, progress)
        await _reconcile_path(link, root, rel, state, progress)
        progress.files_done += 1
        if on_progress and time.monotonic() - last >= 1:
            last = time.monotonic()
            on_progress(progress)


async def _resend(link: PrimaryLink, root: Path, top: bytes, progress: Progress) -> None:
    """Make the peer's ``top`` ours from scratch: whatever it holds there is removed, then
    ours travels whole (a directory with everything under it). Each name is read and its
    first records queued at once; what the application does to a name after that follows
    in the stream, and to a name not reached yet is held back until it is (and read then)."""
    todo = [top]
    while todo:
        rel = todo.pop()
        _reconciled(progress, rel)
        progress.held.pop(rel, None)
        path = _abs(root, rel)
        try:
            st = os.lstat(path)
        except OSError as e:
            if _absent(e):
                link.submit(Record(0, Op.UNLINK, rel, flags=REMOVE_ANY))
            else:
                progress.retry.add(rel)
            continue
        m = st.st_mode
        try:
            if stat.S_ISDIR(m):
                kids = sorted(os.listdir(path), reverse=True)
            elif stat.S_ISLNK(m):
                target = os.readlink(path)
        except OSError:
            progress.retry.add(rel)
            continue
        link.submit(Record(0, Op.UNLINK, rel, flags=REMOVE_ANY))
        if stat.S_ISDIR(m):
            link.submit(Record(0, Op.MKDIR, rel, mode=m, uid=st.st_uid, gid=st.st_gid))
            for r in _meta_records(rel, st):
                link.submit(r)
            for k in kids:
                _pend(progress, rel + b"/" + k)
                todo.append(rel + b"/" + k)
        elif stat.S_ISLNK(m):
            link.submit(Record(0, Op.SYMLINK, rel, path2=target, uid=st.st_uid, gid=st.st_gid))
            for r in _meta_records(rel, st):
                link.submit(r)
        elif stat.S_ISREG(m):
            link.submit(Record(0, Op.CREATE, rel, mode=m, uid=st.st_uid, gid=st.st_gid))
            await _send_ranges(link, root, rel, [(0, INF)], progress)
            _send_meta_now(link, root, rel, st)
        else:
            link.submit(
                Record(0, Op.MKNOD, rel, mode=m, rdev=st.st_rdev, uid=st.st_uid, gid=st.st_gid)
            )
            for r in _meta_records(rel, st):
                link.submit(r)
        progress.files_done += 1
        await _room(link, progress)


async def _replay_renames(link: PrimaryLink, state: DirtyState) -> None:
    """Replay the recorded renames the peer's copy can take, so moved files need not travel;
    put the names of the others in scope (a checksum delta). A rename of a name created
    while the peer was away (logrotate: the new log, rotated again), into a directory it
    lacks, or over a name of the other kind, failed on the peer, the link dropped, and every
    reconnection repeated it. The peer lists the names involved; the renames are played on
    that listing, in order, to know which ones hold."""
    names: set[bytes] = set()
    for src, dst in state.renames:
        names |= {src, dst, dst.rpartition(b"/")[0]}
    names.discard(b"")
    reply, _ = await link.request({"op": "list", "paths": sorted(os.fsdecode(p) for p in names)})
    peer: dict[bytes, int] = {}
    for k, v in (reply.get("tree") or {}).items():
        if isinstance(k, str) and isinstance(v, list) and v and isinstance(v[0], int):
            peer[os.fsencode(k)] = v[0]
    for src, dst in state.renames:
        if _renames(peer, src, dst):
            link.submit(Record(0, Op.RENAME, src, path2=dst))
            moved = {k[len(src) :]: m for k, m in peer.items() if _in_scope(k, {src})}
            for k in [k for k in peer if _in_scope(k, {src}) or _in_scope(k, {dst})]:
                del peer[k]
            peer.update({dst + rest: m for rest, m in moved.items()})
        else:
            state.scope |= {src, dst}
    state.renames = []


def _renames(peer: dict[bytes, int], src: bytes, dst: bytes) -> bool:
    """Whether ``rename(src, dst)`` succeeds on a copy whose names and modes are ``peer``."""
    if src not in peer or src == dst or _in_scope(dst, {src}):
        return False
    parent = dst.rpartition(b"/")[0]
    if parent and not stat.S_ISDIR(peer.get(parent, 0)):
        return False
    if dst in peer:
        if stat.S_ISDIR(peer[src]) != stat.S_ISDIR(peer[dst]):
            return False
        if stat.S_ISDIR(peer[dst]) and any(_in_scope(k, {dst}) and k != dst for k in peer):
            return False  # a directory onto a non-empty one
    return True


async def _reconcile_path(
    link: PrimaryLink, root: Path, rel: bytes, state: DirtyState, progress: Progress
) -> None:
    """One recorded path. Any OSError means it changed meanwhile: gone here (or a directory
    on its way replaced), the peer's goes too; anything else, ``settle`` reads it again."""
    _reconciled(progress, rel)  # what happens to it from now on follows in the stream
    held = progress.held.pop(rel, None)
    if held is not None:  # what the application did to it meanwhile is read now too
        state.touched.add(rel)
        mine = state.ranges.setdefault(rel, RangeSet())
        for a, b in held:
            mine.add(a, b)
    try:
        st = os.lstat(_abs(root, rel))
    except OSError as e:
        if _absent(e) and rel:
            link.submit(Record(0, Op.UNLINK, rel, flags=REMOVE_ANY))
        else:
            progress.retry.add(rel)
        return
    if rel == b"":
        for r in _meta_records(rel, st):
            link.submit(r)
        return
    try:
        await _reconcile(link, root, rel, st, state, progress)
    except OSError as e:
        log.info("resync: %r changed meanwhile (%s): reconciled again", rel, e)
        progress.retry.add(rel)


async def _reconcile(  # noqa: PLR0917
    link: PrimaryLink, root: Path, rel: bytes, st: os.stat_result, state: DirtyState,
    progress: Progress,
) -> None:  # fmt: skip
    m = st.st_mode
    if stat.S_ISDIR(m):
        link.submit(Record(0, Op.MKDIR, rel, mode=m, uid=st.st_uid, gid=st.st_gid))
    elif stat.S_ISLNK(m):
        target = os.readlink(_abs(root, rel))
        link.submit(Record(0, Op.SYMLINK, rel, path2=target, uid=st.st_uid, gid=st.st_gid))
    elif stat.S_ISREG(m):
        rs = state.ranges.get(rel)
        if rs is None or rel in state.touched:
            link.submit(Record(0, Op.CREATE, rel, mode=m, uid=st.st_uid, gid=st.st_gid))
            link.submit(Record(0, Op.TRUNCATE, rel, offset=st.st_size))
        # else only written since the copies were identical: the peer has this very file,
        # and its size differs only by what the ranges extend (a shrink is a TRUNCATE, which
        # touches the path), so the data records alone rebuild it, two records fewer.
        if rs is not None:
            await _send_ranges(link, root, rel, list(rs), progress)
            _send_meta_now(link, root, rel, st)
            return
    else:
        link.submit(Record(0, Op.MKNOD, rel, mode=m, rdev=st.st_rdev, uid=st.st_uid, gid=st.st_gid))
    for r in _meta_records(rel, st):
        link.submit(r)


def _send_meta_now(link: PrimaryLink, root: Path, rel: bytes, was: os.stat_result) -> None:
    """The metadata of ``rel`` as it is now, if it still names the file ``was`` describes:
    the application may have changed it (chmod, a write's mtime) while its data travelled,
    and a stale SETATTR queued after that change would undo it on the peer. Renamed or
    replaced meanwhile: its operations are in the stream, nothing to send."""
    try:
        st = os.lstat(_abs(root, rel))
    except OSError:
        return
    if (st.st_dev, st.st_ino) == (was.st_dev, was.st_ino):
        for r in _meta_records(rel, st):
            link.submit(r)


# --------------------------------------------------------------------------- full


async def full_delta(  # noqa: PLR0917
    link: PrimaryLink, root: Path, progress: Progress, checksum: bool = False,
    quarantine: bool = False, on_progress: Callable[[Progress], None] | None = None,
    scope: set[bytes] | None = None,
) -> None:  # fmt: skip
    """The delta over the whole tree, or over the subtrees of ``scope`` only."""
    ask: dict[str, Any] = {"op": "list"}
    if scope is None:
        progress.kind = "full"
    else:
        ask["paths"] = sorted(os.fsdecode(p) for p in scope)
    reply, _ = await link.request(ask)
    theirs: dict[str, list[int]] = reply.get("tree", {})
    ours = await trio.to_thread.run_sync(list_tree, root, scope)
    changed = [p for p, v in ours.items() if checksum or theirs.get(p) != v]
    removed = [p for p in theirs if p not in ours]
    doomed = [p for p in changed if p in theirs] + removed
    if quarantine and doomed:
        reply, _ = await link.request({"op": "quarantine", "paths": doomed})
        if reply.get("error"):
            # The peer could not put its diverging files aside: overwriting them would lose
            # the only copy of what it wrote during the split. Stop; the operator sees why.
            raise LinkLost(f"the peer could not quarantine its diverging files: {reply['error']}")
    progress.bytes_total = progress.bytes_done + sum(
        ours[p][1] for p in changed if stat.S_ISREG(ours[p][0])
    )
    for p in sorted(removed, key=lambda s: -s.count("/")):
        link.submit(Record(0, Op.UNLINK, os.fsencode(p), flags=REMOVE_ANY))
    last = time.monotonic()
    for p in sorted(changed, key=lambda s: (s.count("/"), s)):
        rel = os.fsencode(p)
        try:
            st = os.lstat(_abs(root, rel))
        except OSError as e:
            # Gone meanwhile: its operation is in the stream. Otherwise: read again later.
            if not _absent(e):
                progress.retry.add(rel)
            continue
        t = theirs.get(p)
        if t is not None and stat.S_IFMT(t[0]) != stat.S_IFMT(st.st_mode):
            link.submit(Record(0, Op.UNLINK, rel, flags=REMOVE_ANY))
            t = None
        try:
            if stat.S_ISREG(st.st_mode):
                await _send_file(link, root, rel, st, None if t is None else t[1], progress)
                _send_meta_now(link, root, rel, st)
            else:
                await _reconcile(link, root, rel, st, DirtyState(), progress)
        except OSError as e:
            # Rotated, removed or replaced while its delta was made: ``settle`` reconciles
            # it where it is now (its rename, if any, is among the changes noted).
            log.info("resync: %r changed meanwhile (%s): reconciled again", rel, e)
            progress.retry.add(rel)
        progress.files_done += 1
        if on_progress and time.monotonic() - last >= 1:
            last = time.monotonic()
            on_progress(progress)


full = full_delta  # the name callers and tests know


async def _send_file(  # noqa: PLR0917
    link: PrimaryLink, root: Path, rel: bytes, st: os.stat_result, their_size: int | None,
    progress: Progress,
) -> None:  # fmt: skip
    """The file as a delta against the secondary's copy of ``their_size`` bytes (None: it
    has none), whole if small."""
    path = _abs(root, rel)
    if their_size is None or st.st_size <= SMALL_FILE:
        # read and queue with no checkpoint in between (ordering with live writes)
        link.submit(Record(0, Op.CREATE, rel, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid))
        if st.st_size <= SMALL_FILE:
            data = _read(path)
            link.submit(Record(0, Op.REPLACE, rel, data=data))
            progress.bytes_done += len(data)
        else:
            link.submit(Record(0, Op.TRUNCATE, rel, offset=0))
            await _send_ranges(link, root, rel, [(0, 1 << 62)], progress)
        return
    # The secondary's signature and our own block hashes at the same block size at once:
    # the delta then matches data changed in place without hashing (1 GiB: ~0.7 s).
    bs = D.block_size_for(their_size)
    ours: list[bytes] = []

    async def hash_ours() -> None:
        with contextlib.suppress(OSError):  # gone meanwhile: the delta finds out
            ours.append(await trio.to_thread.run_sync(D.block_hashes_file, path, bs, their_size))

    async with trio.open_nursery() as n:
        n.start_soon(hash_ours)
        reply, sig_bytes = await link.request({"op": "sig", "path": os.fsdecode(rel)})
    if "error" in reply:
        await _send_ranges(link, root, rel, [(0, st.st_size)], progress)
        return
    sig = D.Signature.decode(sig_bytes)
    known = ours[0] if ours and sig.block_size == bs else None
    d = await trio.to_thread.run_sync(D.delta_file, sig, path, known)
    # Live writes may land between pieces (and on the old file): they are among the changes
    # noted meanwhile, and ``settle`` sends them again.
    # In place (data changed where it lay), the secondary writes only the literals over its
    # file: a piece costs it no more than its own size, and it rewrites no 1 GiB beside.
    in_place = D.in_place(d)
    pieces = list(D.split(d, DELTA_PIECE, (1 << 62) if in_place else DELTA_PIECE_OUTPUT))
    out = 0
    sent: list[int] = []
    for i, piece in enumerate(pieces):
        await _room(link, progress)
        # A piece costs the secondary up to 32 MiB of rebuilding for maybe a few KiB on the
        # wire, which the byte window does not see: at most two pieces ahead of the one it
        # rebuilds, so its keepalive answers stay within the timeout.
        if len(sent) >= 2:
            await link.wait_progress(lambda: link.stats().received_seq >= sent[-2])
        if not _same_or_longer(path, st):
            # Renamed, replaced or cut shorter since the peer signed it (at the same stream
            # position as our stat): the rest of the delta would land on another file or
            # copy past the end of the peer's. Read again by ``settle``, whole.
            log.info("resync: %r changed during its delta: done again", rel)
            progress.retry.add(rel)
            return
        flags = (DELTA_CONT if i else 0) | (DELTA_MORE if i < len(pieces) - 1 else 0)
        flags |= DELTA_IN_PLACE if in_place else 0
        sent.append(
            link.submit(Record(0, Op.DELTA, rel, offset=out, flags=flags, data=piece.encode()))
        )
        link.ping()  # answered once the piece is rebuilt: its receipt ack
        out += piece.length
        progress.bytes_done += piece.length


def _same_or_longer(path: bytes, was: os.stat_result) -> bool:
    """``path`` still names the file ``was`` describes, and it is no shorter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (was.st_dev, was.st_ino) and st.st_size >= was.st_size


def _read(path: bytes) -> bytes:
    fd = beneath.open_file(path)  # never a FIFO's wait (OSError: not a file anymore)
    try:
        return os.read(fd, SMALL_FILE)
    finally:
        os.close(fd)
