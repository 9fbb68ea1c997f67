"""The incremental pass: replay the recorded renames, then reconcile each recorded path
(existence, type, metadata, size) and send exactly its dirty byte ranges."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from ha_runtime.replication import control
from ha_runtime.replication.dirtylog import INF, DirtyState, RangeSet
from ha_runtime.replication.journal import Op, Record
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.resync.full import full_delta
from ha_runtime.replication.resync.progress import (
    Progress,
    ancestors,
    in_scope,
    pend,
    pend_all,
    reconciled,
    unpend,
)
from ha_runtime.replication.resync.send import (
    REMOVE_ANY,
    Batcher,
    abs_path,
    absent,
    bytes_to_send,
    meta_records,
    reconcile,
    reconcile_now,
    room,
    send_meta_now,
    send_ranges,
)

log = logging.getLogger("hapair.replication")


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
    pend_all(progress, state.touched | set(state.ranges) | state.scope)
    if state.renames and not state.scope:
        await _replay_renames(link, state)
    if b"" in state.scope:  # the root is never replaced: its metadata is reconciled
        state.scope.discard(b"")
        state.touched.add(b"")
    for p in state.scope:  # renames not replayed: their names are read whole
        pend(progress, p)
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
        ups = {a for p in state.scope for a in ancestors(p)} & state.touched
        for a in sorted(ups, key=lambda p: (p.count(b"/"), p)):
            await _reconcile_path(link, root, a, state, progress)
            state.touched.discard(a)
        await full_delta(link, root, progress, checksum=True, scope=state.scope,
                         on_progress=on_progress)  # fmt: skip
        for p in list(state.scope):
            unpend(progress, p)
        # (what was held meanwhile is left over: the next round)
        # The delta made every file under the scope equal to ours as it read it: their
        # ranges need not travel again (changes since are ``settle``'s).
        for p in [p for p in state.ranges if in_scope(p, state.scope)]:
            del state.ranges[p]
        state.touched = {p for p in state.touched if not in_scope(p, state.scope)}
    await reconcile_paths(link, root, state, progress, on_progress)
    progress.queued_s = time.monotonic() - progress.started
    return delta


async def reconcile_paths(
    link: PrimaryLink, root: Path, state: DirtyState, progress: Progress,
    on_progress: Callable[[Progress], None] | None,
) -> None:  # fmt: skip
    progress.bytes_total = progress.bytes_done + bytes_to_send(root, state)
    paths = sorted(state.touched | set(state.ranges), key=lambda p: (p.count(b"/"), p))
    last = time.monotonic()
    out = Batcher(link, progress.batch)
    for rel in paths:
        if out.full():
            out.flush()  # before the scheduling point (see Batcher)
            await room(link, progress)
        if not _reconcile_path_now(out, root, rel, state, progress):
            out.flush()
            await room(link, progress)
            await _reconcile_path(link, root, rel, state, progress)
        progress.files_done += 1
        if on_progress and time.monotonic() - last >= 1:
            last = time.monotonic()
            on_progress(progress)
    out.flush()


async def resend(link: PrimaryLink, root: Path, top: bytes, progress: Progress) -> None:
    """Make the peer's ``top`` ours from scratch: whatever it holds there is removed, then
    ours travels whole (a directory with everything under it). Each name is read and its
    first records queued at once; what the application does to a name after that follows
    in the stream, and to a name not reached yet is held back until it is (and read then)."""
    todo = [top]
    while todo:
        rel = todo.pop()
        reconciled(progress, rel)
        progress.held.pop(rel, None)
        path = abs_path(root, rel)
        try:
            st = os.lstat(path)
        except OSError as e:
            if absent(e):
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
            for r in meta_records(rel, st):
                link.submit(r)
            for k in kids:
                pend(progress, rel + b"/" + k)
                todo.append(rel + b"/" + k)
        elif stat.S_ISLNK(m):
            link.submit(Record(0, Op.SYMLINK, rel, path2=target, uid=st.st_uid, gid=st.st_gid))
            for r in meta_records(rel, st):
                link.submit(r)
        elif stat.S_ISREG(m):
            link.submit(Record(0, Op.CREATE, rel, mode=m, uid=st.st_uid, gid=st.st_gid))
            await send_ranges(link, root, rel, [(0, INF)], progress)
            send_meta_now(link, root, rel, st)
        else:
            link.submit(
                Record(0, Op.MKNOD, rel, mode=m, rdev=st.st_rdev, uid=st.st_uid, gid=st.st_gid)
            )
            for r in meta_records(rel, st):
                link.submit(r)
        progress.files_done += 1
        await room(link, progress)


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
    reply, _ = await link.request(control.list_tree(sorted(os.fsdecode(p) for p in names)))
    peer: dict[bytes, int] = {}
    for k, v in (reply.get("tree") or {}).items():
        if isinstance(k, str) and isinstance(v, list) and v and isinstance(v[0], int):
            peer[os.fsencode(k)] = v[0]
    for src, dst in state.renames:
        if _renames(peer, src, dst):
            link.submit(Record(0, Op.RENAME, src, path2=dst))
            moved = {k[len(src) :]: m for k, m in peer.items() if in_scope(k, {src})}
            for k in [k for k in peer if in_scope(k, {src}) or in_scope(k, {dst})]:
                del peer[k]
            peer.update({dst + rest: m for rest, m in moved.items()})
        else:
            state.scope |= {src, dst}
    state.renames = []


def _renames(peer: dict[bytes, int], src: bytes, dst: bytes) -> bool:
    """Whether ``rename(src, dst)`` succeeds on a copy whose names and modes are ``peer``."""
    if src not in peer or src == dst or in_scope(dst, {src}):
        return False
    parent = dst.rpartition(b"/")[0]
    if parent and not stat.S_ISDIR(peer.get(parent, 0)):
        return False
    if dst in peer:
        if stat.S_ISDIR(peer[src]) != stat.S_ISDIR(peer[dst]):
            return False
        if stat.S_ISDIR(peer[dst]) and any(in_scope(k, {dst}) and k != dst for k in peer):
            return False  # a directory onto a non-empty one
    return True


def _reconcile_path_now(
    out: Batcher, root: Path, rel: bytes, state: DirtyState, progress: Progress
) -> bool:
    """``_reconcile_path`` with no scheduling point (its records queued in ``out``), unless
    the path is a file with much data to send: False, nothing queued, ``_reconcile_path``
    it (which reads it again, after the caller's wait)."""
    st = _begin(out, root, rel, state, progress)
    if st is None:
        return True
    try:
        now = reconcile_now(out, root, rel, st, state, progress)
    except OSError as e:
        log.info("resync: %r changed meanwhile (%s): reconciled again", rel, e)
        progress.retry.add(rel)
        return True
    if not now:
        # Pending again until ``_reconcile_path`` begins it: the caller waits for room
        # first, and an operation on it meanwhile could reach the peer before the file.
        pend(progress, rel)
    return now


async def _reconcile_path(
    link: PrimaryLink, root: Path, rel: bytes, state: DirtyState, progress: Progress
) -> None:
    """One recorded path. Any OSError means it changed meanwhile: gone here (or a directory
    on its way replaced), the peer's goes too; anything else, ``settle`` reads it again."""
    st = _begin(link, root, rel, state, progress)
    if st is None:
        return
    try:
        await reconcile(link, root, rel, st, state, progress)
    except OSError as e:
        log.info("resync: %r changed meanwhile (%s): reconciled again", rel, e)
        progress.retry.add(rel)


def _begin(
    out: PrimaryLink | Batcher, root: Path, rel: bytes, state: DirtyState, progress: Progress
) -> os.stat_result | None:
    """The start of a path's reconciliation: from now on what happens to it follows in the
    stream, what was held back for it is read now too; its ``lstat``, or None when nothing
    more is to be done (gone: removed on the peer; unreadable: ``settle``; the root: its
    metadata)."""
    reconciled(progress, rel)
    held = progress.held.pop(rel, None)
    if held is not None:
        state.touched.add(rel)
        mine = state.ranges.setdefault(rel, RangeSet())
        for a, b in held:
            mine.add(a, b)
    try:
        st = os.lstat(abs_path(root, rel))
    except OSError as e:
        if absent(e) and rel:
            out.submit(Record(0, Op.UNLINK, rel, flags=REMOVE_ANY))
        else:
            progress.retry.add(rel)
        return None
    if rel == b"":
        for r in meta_records(rel, st):
            out.submit(r)
        return None
    return st
