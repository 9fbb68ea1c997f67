"""What every resync pass sends with: byte ranges read at send time, metadata records,
and pacing against the link (``RESYNC_WINDOW``)."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import trio

from ha_runtime.replication import batch, beneath
from ha_runtime.replication.dirtylog import DirtyState
from ha_runtime.replication.journal import (
    SET_ATIME,
    SET_GID,
    SET_MODE,
    SET_MTIME,
    SET_UID,
    Op,
    Record,
)
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.resync.progress import Progress

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

REMOVE_ANY = 1  # UNLINK flag: remove whatever is there (file or tree)

SMALL_FILE = 64 << 10


def abs_path(root: Path, rel: bytes) -> bytes:
    return os.fsencode(root) + (b"/" + rel if rel else b"")


def meta_records(rel: bytes, st: os.stat_result) -> list[Record]:
    flags = SET_UID | SET_GID | SET_ATIME | SET_MTIME
    if not stat.S_ISLNK(st.st_mode):
        flags |= SET_MODE
    return [
        Record(
            0, Op.SETATTR, rel, flags=flags, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
            atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns,
        )
    ]  # fmt: skip


class Batcher:
    """A resync's records on their way to the link: packed into BATCH records (``batch``)
    when the peer applies them, else submitted one by one as before. What is queued here
    must reach the link before the next scheduling point (``flush``): a record read here and
    held across one would land on the peer after a live write queued meanwhile."""

    def __init__(self, link: PrimaryLink, enabled: bool) -> None:
        self.link = link
        self.enabled = enabled
        self._batch = batch.Builder()

    def submit(self, rec: Record) -> None:
        if not self.enabled or rec.op not in batch.BATCHABLE:
            self.flush()
            self.link.submit(rec)
            return
        self._batch.add(rec)

    def read(self, fd: int, rel: bytes, offset: int, length: int) -> int:
        """A WRITE of up to ``length`` bytes of ``fd`` read at ``offset``; bytes read."""
        if not self.enabled:
            data = os.pread(fd, length, offset)
            if data:
                self.link.submit(Record(0, Op.WRITE, rel, offset=offset, data=data))
            return len(data)
        return self._batch.read(fd, rel, offset, length)

    def full(self) -> bool:
        """Time to flush and wait for room (without batches: before every path, as before)."""
        b = self._batch
        return not self.enabled or b.size >= batch.BATCH_BYTES or b.count >= batch.BATCH_ENTRIES

    def flush(self) -> None:
        if self._batch.count:
            self.link.submit(Record(0, Op.BATCH, b"", data=self._batch.take()))


async def room(link: PrimaryLink, progress: Progress) -> None:
    """Backpressure of a resync: the link's own limit, then RESYNC_WINDOW. TooSlowError
    when no acknowledgement at all came for a whole timeout (as ``PrimaryLink.room``)."""
    await link.room()
    st = link.stats()
    if st.inflight_bytes > RESYNC_WINDOW // 2 and st.received_seq >= progress.pinged_seq:
        link.ping()  # the previous one was answered: ask for the next receipt ack
        progress.pinged_seq = st.last_seq
    await link.wait_progress(lambda: link.stats().inflight_bytes <= RESYNC_WINDOW)


async def send_ranges(
    link: PrimaryLink, root: Path, rel: bytes, ranges: list[tuple[int, int]], progress: Progress
) -> None:
    """Queue WRITE records for the ranges (clipped to the current size), chunk by chunk.
    Each chunk is read and queued only while ``rel`` still names the file opened: renamed,
    removed or replaced meanwhile, the rest of the file is left to its new name (the
    application's operation is in the stream, and ``settle`` reconciles where it went)."""
    path = abs_path(root, rel)
    try:
        fd = beneath.open_file(path)  # O_NONBLOCK: a FIFO here never waits
    except OSError as e:
        # EINVAL: not a regular file anymore (its own op is in the stream, as for gone)
        if not absent(e) and e.errno != errno.EINVAL:
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
                await room(link, progress)
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


def send_ranges_now(
    out: Batcher, root: Path, rel: bytes, ranges: list[tuple[int, int]], progress: Progress
) -> None:
    """``send_ranges`` of a file whose ranges are read at once (at most about NOW_BYTES):
    no scheduling point, so the name cannot change meanwhile; OSError: read again later."""
    try:
        fd = beneath.open_file(abs_path(root, rel))  # O_NONBLOCK: a FIFO here never waits
    except OSError as e:
        if not absent(e) and e.errno != errno.EINVAL:
            progress.retry.add(rel)
        return  # gone or not a file anymore: its own op is in the stream
    try:
        size = os.fstat(fd).st_size
        for a, b in ranges:
            off = a
            while off < min(b, size):
                n = out.read(fd, rel, off, min(b, size, off + CHUNK) - off)
                if not n:
                    break
                progress.bytes_done += n
                off += n
    finally:
        os.close(fd)


# A file with at most this many dirty bytes is read and queued at once (in a batch).
NOW_BYTES = 1 << 20


def reconcile_now(  # noqa: PLR0917
    out: Batcher, root: Path, rel: bytes, st: os.stat_result, state: DirtyState,
    progress: Progress,
) -> bool:  # fmt: skip
    """``reconcile`` with no scheduling point, for anything but a file with more than
    NOW_BYTES to send (False: nothing was queued, ``reconcile`` it)."""
    m = st.st_mode
    rs = state.ranges.get(rel)
    if stat.S_ISREG(m) and rs is not None and rs.total(st.st_size) > NOW_BYTES:
        return False
    if stat.S_ISDIR(m):
        out.submit(Record(0, Op.MKDIR, rel, mode=m, uid=st.st_uid, gid=st.st_gid))
    elif stat.S_ISLNK(m):
        target = os.readlink(abs_path(root, rel))
        out.submit(Record(0, Op.SYMLINK, rel, path2=target, uid=st.st_uid, gid=st.st_gid))
    elif stat.S_ISREG(m):
        if rs is None or rel in state.touched:
            out.submit(Record(0, Op.CREATE, rel, mode=m, uid=st.st_uid, gid=st.st_gid))
            out.submit(Record(0, Op.TRUNCATE, rel, offset=st.st_size))
        if rs is not None:
            send_ranges_now(out, root, rel, list(rs), progress)
            send_meta_now(out, root, rel, st)  # as ``reconcile`` (our read may set atime)
            return True
    else:
        out.submit(Record(0, Op.MKNOD, rel, mode=m, rdev=st.st_rdev, uid=st.st_uid, gid=st.st_gid))
    for r in meta_records(rel, st):
        out.submit(r)
    return True


def absent(e: OSError) -> bool:
    """The path names nothing here: it, or a directory on its way, is gone or replaced."""
    return e.errno in (errno.ENOENT, errno.ENOTDIR)


def bytes_to_send(root: Path, state: DirtyState) -> int:
    """The dirty bytes within the files' sizes: the log records appends up to the next
    APPEND_EXTENT, which never travels (progress and ETA would count 4 MiB per new file)."""
    total = 0
    for rel, rs in state.ranges.items():
        try:
            total += rs.total(os.lstat(abs_path(root, rel)).st_size)
        except OSError:
            continue
    return total


def same_or_longer(path: bytes, was: os.stat_result) -> bool:
    """``path`` still names the file ``was`` describes, and it is no shorter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (was.st_dev, was.st_ino) and st.st_size >= was.st_size


def read_small(path: bytes) -> bytes:
    fd = beneath.open_file(path)  # never a FIFO's wait (OSError: not a file anymore)
    try:
        return os.read(fd, SMALL_FILE)
    finally:
        os.close(fd)


async def reconcile(  # noqa: PLR0917
    link: PrimaryLink, root: Path, rel: bytes, st: os.stat_result, state: DirtyState,
    progress: Progress,
) -> None:  # fmt: skip
    m = st.st_mode
    if stat.S_ISDIR(m):
        link.submit(Record(0, Op.MKDIR, rel, mode=m, uid=st.st_uid, gid=st.st_gid))
    elif stat.S_ISLNK(m):
        target = os.readlink(abs_path(root, rel))
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
            await send_ranges(link, root, rel, list(rs), progress)
            send_meta_now(link, root, rel, st)
            return
    else:
        link.submit(Record(0, Op.MKNOD, rel, mode=m, rdev=st.st_rdev, uid=st.st_uid, gid=st.st_gid))
    for r in meta_records(rel, st):
        link.submit(r)


def send_meta_now(link: PrimaryLink | Batcher, root: Path, rel: bytes, was: os.stat_result) -> None:
    """The metadata of ``rel`` as it is now, if it still names the file ``was`` describes:
    the application may have changed it (chmod, a write's mtime) while its data travelled,
    and a stale SETATTR queued after that change would undo it on the peer. Renamed or
    replaced meanwhile: its operations are in the stream, nothing to send."""
    try:
        st = os.lstat(abs_path(root, rel))
    except OSError:
        return
    if (st.st_dev, st.st_ino) == (was.st_dev, was.st_ino):
        for r in meta_records(rel, st):
            link.submit(r)
