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
- **Verify** (``tree_digests``): SHA-256 per regular file, link targets, directory entries;
  the primary compares both sides.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ha_runtime.replication import beneath
from ha_runtime.replication import delta as D
from ha_runtime.replication.dirtylog import DirtyState
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
from ha_runtime.replication.transport import PrimaryLink

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


@dataclass
class Progress:
    kind: str = "incremental"
    bytes_total: int = 0
    bytes_done: int = 0
    files_done: int = 0
    started: float = field(default_factory=time.monotonic)
    pinged_seq: int = 0  # last record sent before the resync's latest keepalive
    queued_s: float | None = None  # when everything was queued (the rest: the final barrier)

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
    """Queue WRITE records for the ranges (clipped to the current size), chunk by chunk."""
    try:
        fd = beneath.open_file(_abs(root, rel))  # O_NONBLOCK: a FIFO here never waits
    except OSError:
        return  # gone or not a file anymore: its own op is in the stream
    try:
        for a, b in ranges:
            off = a
            while True:
                await _room(link, progress)
                # read + queue without a checkpoint in between (ordering with live writes)
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
        os.close(fd)


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


async def incremental(
    link: PrimaryLink, root: Path, state: DirtyState, progress: Progress,
    on_progress: Callable[[Progress], None] | None = None,
) -> None:  # fmt: skip
    """Send exactly what ``state`` records. Paths in ``state.scope`` (a returning primary's
    names, in whatever state its copy left them) first get a checksum delta over their
    subtrees, then the recorded ranges and paths travel."""
    progress.kind = "incremental"
    if b"" in state.scope:  # the root is never replaced: its metadata is reconciled
        state.scope.discard(b"")
        state.touched.add(b"")
    if state.scope:
        # The peer's copy may differ from the one our renames were recorded against (names
        # in scope): replaying one there could fail or misplace; both names are reconciled
        # whole instead.
        for src, dst in state.renames:
            state.scope |= {src, dst}
        state.renames = []
        await full(link, root, progress, checksum=True, scope=state.scope,
                   on_progress=on_progress)  # fmt: skip
    progress.bytes_total = progress.bytes_done + _bytes_to_send(root, state)
    for src, dst in state.renames:
        link.submit(Record(0, Op.RENAME, src, path2=dst))
    paths = sorted(state.touched | set(state.ranges), key=lambda p: (p.count(b"/"), p))
    last = time.monotonic()
    for rel in paths:
        await _room(link, progress)
        if rel == b"":
            st0 = os.lstat(root)
            for r in _meta_records(rel, st0):
                link.submit(r)
            continue
        try:
            st = os.lstat(_abs(root, rel))
        except FileNotFoundError:
            link.submit(Record(0, Op.UNLINK, rel, flags=REMOVE_ANY))
            continue
        await _reconcile(link, root, rel, st, state, progress)
        progress.files_done += 1
        if on_progress and time.monotonic() - last >= 1:
            last = time.monotonic()
            on_progress(progress)
    progress.queued_s = time.monotonic() - progress.started


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
    else:
        link.submit(Record(0, Op.MKNOD, rel, mode=m, rdev=st.st_rdev, uid=st.st_uid, gid=st.st_gid))
    for r in _meta_records(rel, st):
        link.submit(r)


# --------------------------------------------------------------------------- full


def list_tree(root: Path, scope: Iterable[bytes] | None = None) -> dict[str, list[int]]:
    """path -> [mode, size, mtime_ns] of everything under root (not root itself); with
    ``scope``, of those paths and everything under them only (a path that is not valid, or
    whose parent is not a directory inside root, a symlink on the way included, is left
    out). Never follows a symlink; paths longer than a record can name are left out."""
    out: dict[str, list[int]] = {}
    rfd = os.open(root, beneath.DIR_FLAGS)
    try:
        tops = [b""] if scope is None else []
        for rel in scope or ():
            st = _lstat_beneath(rfd, rel)
            if st is None:
                continue
            out[os.fsdecode(rel)] = [st.st_mode, st.st_size, st.st_mtime_ns]
            if stat.S_ISDIR(st.st_mode):
                tops.append(rel)
        for top in tops:
            for rel, st, _, _ in beneath.walk(rfd, top):
                out[os.fsdecode(rel)] = [st.st_mode, st.st_size, st.st_mtime_ns]
    finally:
        os.close(rfd)
    return out


def _lstat_beneath(rfd: int, rel: bytes) -> os.stat_result | None:
    """lstat of ``rel`` beneath the root; None when invalid, missing or not reachable
    without following a symlink."""
    try:
        pfd, name = beneath.open_parent(rfd, rel)
    except (OSError, ValueError):
        return None
    try:
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        if pfd != rfd:
            os.close(pfd)


async def full(  # noqa: PLR0917
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
        await link.request({"op": "quarantine", "paths": doomed})
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
        except FileNotFoundError:
            continue
        t = theirs.get(p)
        if t is not None and stat.S_IFMT(t[0]) != stat.S_IFMT(st.st_mode):
            link.submit(Record(0, Op.UNLINK, rel, flags=REMOVE_ANY))
            t = None
        if stat.S_ISREG(st.st_mode):
            await _send_file(link, root, rel, st, None if t is None else t[1], progress)
            for r in _meta_records(rel, st):
                link.submit(r)
        else:
            await _reconcile(link, root, rel, st, DirtyState(), progress)
        progress.files_done += 1
        if on_progress and time.monotonic() - last >= 1:
            last = time.monotonic()
            on_progress(progress)


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
    # Live writes may land between pieces (and on the old file): they are in the dirty log
    # and the incremental pass after the full one sends them again.
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
        flags = (DELTA_CONT if i else 0) | (DELTA_MORE if i < len(pieces) - 1 else 0)
        flags |= DELTA_IN_PLACE if in_place else 0
        sent.append(
            link.submit(Record(0, Op.DELTA, rel, offset=out, flags=flags, data=piece.encode()))
        )
        link.ping()  # answered once the piece is rebuilt: its receipt ack
        out += piece.length
        progress.bytes_done += piece.length


def _read(path: bytes) -> bytes:
    fd = beneath.open_file(path)  # never a FIFO's wait (OSError: not a file anymore)
    try:
        return os.read(fd, SMALL_FILE)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- verify


def tree_digests(root: Path) -> dict[str, str]:
    """Digest of everything under root (`_digest_at`), never following a symlink."""
    out: dict[str, str] = {}
    rfd = os.open(root, beneath.DIR_FLAGS)
    try:
        for rel, st, dfd, name in beneath.walk(rfd):
            digest = _digest_at(dfd, name, st)
            if digest is not None:
                out[os.fsdecode(rel)] = digest
    finally:
        os.close(rfd)
    return out


def digests_of(root: Path, paths: list[str]) -> dict[str, str]:
    """The digests of `tree_digests` for some relative paths only (missing, unreachable
    and invalid ones left out)."""
    out: dict[str, str] = {}
    rfd = os.open(root, beneath.DIR_FLAGS)
    try:
        for p in paths:
            try:
                rel = os.fsencode(p)
                pfd, name = beneath.open_parent(rfd, rel)
            except (OSError, ValueError):
                continue  # not encodable, not valid, or not beneath root without a symlink
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                digest = _digest_at(pfd, name, st)
            except OSError:
                continue
            finally:
                if pfd != rfd:
                    os.close(pfd)
            if digest is not None:
                out[p] = digest
    finally:
        os.close(rfd)
    return out


def _digest_at(dfd: int, name: bytes, st: os.stat_result) -> str | None:
    """``f:<sha256>`` of a regular file, ``l:<target>`` of a symlink, ``m:<type>`` else;
    None when it vanished meanwhile, ``e:<errno>`` when it could not be read."""
    try:
        if stat.S_ISREG(st.st_mode):
            fd = beneath.open_file(name, dfd)
            try:
                h = hashlib.sha256()
                while chunk := os.read(fd, 1 << 20):
                    h.update(chunk)
            finally:
                os.close(fd)
            return "f:" + h.hexdigest()
        if stat.S_ISLNK(st.st_mode):
            return "l:" + os.fsdecode(os.readlink(name, dir_fd=dfd))
        return f"m:{stat.S_IFMT(st.st_mode):o}"
    except FileNotFoundError:
        return None
    except OSError as e:
        # Replaced by another type meanwhile (ELOOP, EINVAL): a difference verify reports
        # and checks again, never a read of something else.
        return f"e:{e.errno}"


def compare(ours: dict[str, str], theirs: dict[str, str]) -> list[str]:
    diffs = []
    for p in sorted(set(ours) | set(theirs)):
        a, b = ours.get(p), theirs.get(p)
        if a != b:
            diffs.append(f"{p}: primary {a or 'missing'}, secondary {b or 'missing'}")
    return diffs
