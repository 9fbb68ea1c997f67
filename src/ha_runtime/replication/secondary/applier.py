"""Apply journal records to a backing directory (the secondary's copy).

- **Path-safe**: every path is resolved component by component from the root with
  ``O_NOFOLLOW | O_DIRECTORY``, and the last component is acted on relative to its parent's
  descriptor without following symlinks, so neither ``..`` nor a symlink (planted or
  replicated) can make a record touch anything outside the root.
- **Idempotent**: replaying a record that was already applied leaves the same result
  (creating what exists, removing what is gone, renaming what was already renamed are
  no-ops), so a resync or a reconnect may resend records safely.
- **Durable on request**: a ``FSYNC`` record (barrier) fsyncs every file written and every
  directory changed since the previous barrier, then ``durable_seq`` advances.
- **Authoritative**: the primary performed the operation, so whatever of another type holds
  the name here (a directory where a file is created, a file where a directory is made...)
  is removed first, a directory with its whole tree, through directory descriptors,
  never following a symlink. Refusing it left the copy unrepairable by an incremental
  resync, which repeated the same refusal on every reconnection.
- **Refusals**: ``apply`` raises ``OSError`` (the file system refused: ENOSPC, EIO...) or
  ``RecordRefused`` (a ``ValueError``: unsafe path, field out of range, delta out of
  sequence), never anything else; the secondary drops the link and counts it.

Long because: one class, one handler per journal operation, one lock, one dirty set.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from ha_runtime.replication import batch, beneath
from ha_runtime.replication import delta as D
from ha_runtime.replication.beneath import open_file, open_parent
from ha_runtime.replication.fsops import fallocate, libc, renameat2, set_attributes
from ha_runtime.replication.journal import (
    DELTA_CONT,
    DELTA_IN_PLACE,
    DELTA_MORE,
    FSYNC_DATA,
    SET_SIZE,
    Op,
    Record,
)
from ha_runtime.replication.secondary.staging import Staging

# A barrier with more dirty files than this syncs the file system once (syncfs) instead of
# each file: a live fsync touches one or a few files, a resync hundreds.
SYNCFS_OVER = 8
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Owner ids are unsigned 32-bit; (uid_t)-1 means "leave unchanged" (chown(2)), which the
# journal carries as 0xFFFFFFFF and a Record as -1.
ID_UNCHANGED = 0xFFFFFFFF
_XATTR_FLAGS = os.XATTR_CREATE | os.XATTR_REPLACE
# rename(2) errors that mean "the target is of another type" (or a non-empty directory).
_RENAME_TYPE_ERRORS = frozenset({errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST})
_RENAME_EXCHANGE = 2
_ID_OPS = frozenset({Op.CREATE, Op.MKNOD, Op.MKDIR, Op.SYMLINK, Op.SETATTR})


class RecordRefused(ValueError):
    """A record the applier will not apply (a field out of range, an unsafe path...)."""


class UnsafePath(RecordRefused, beneath.UnsafePath):
    """A path that would leave the root (``beneath`` refused to resolve it)."""


class DeltaRefused(RecordRefused, D.DeltaError):
    """A malformed delta, or a piece out of sequence (still a ``DeltaError``)."""


class Applier:
    def __init__(self, root: Path, max_open: int = 256) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.root_fd = os.open(root, _DIR_FLAGS)
        self._staging = Staging(root, self.root_fd)
        self.max_open = max_open
        self._files: dict[bytes, int] = {}  # path -> writable fd
        self._pending: list[int] = []  # fds to fsync at the next barrier, then close
        self._dirty_files: set[bytes] = set()
        self._dirty_dirs: set[bytes] = set()
        self.applied_seq = 0
        self.durable_seq = 0
        self._deltas: dict[bytes, int] = {}  # path -> fd of its new file, pieces arriving
        self._in_place: dict[bytes, int] = {}  # path -> where its in-place delta's next piece goes
        # Records and barriers never interleave, whichever session or thread runs them: a
        # barrier clears exactly the dirty sets it synced (one of an old session, still in
        # its thread, cleared what a new one had written: its FSYNC was acked unsynced).
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            for fd in list(self._files.values()) + self._pending:
                os.close(fd)
            for fd in self._deltas.values():
                self._staging.discard(fd)
            self._files.clear()
            self._pending.clear()
            self._deltas.clear()
            self._staging.close()
            os.close(self.root_fd)

    # -- path resolution
    def _parent(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the parent directory, last component). The caller closes the fd unless it
        is ``root_fd``."""
        return open_parent(self.root_fd, path)

    def _done(self, fd: int) -> None:
        if fd != self.root_fd:
            os.close(fd)

    def _file(self, path: bytes, create_mode: int | None = None) -> int:
        fd = self._files.get(path)
        if fd is not None:
            return fd
        pfd, name = self._parent(path)
        try:
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            if create_mode is not None:
                flags |= os.O_CREAT
            fd = os.open(name, flags, create_mode or 0o600, dir_fd=pfd)
        finally:
            self._done(pfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", path)
        if len(self._files) >= self.max_open:
            self._retire(next(iter(self._files)))
        self._files[path] = fd
        return fd

    def _retire(self, path: bytes) -> None:
        fd = self._files.pop(path, None)
        if fd is not None:
            if path in self._dirty_files:
                self._pending.append(fd)
            else:
                os.close(fd)

    def _retire_under(self, path: bytes) -> None:
        for p in [p for p in self._files if p == path or p.startswith(path + b"/")]:
            self._retire(p)
        # A name gone or replaced: a delta patching it in place must not go on elsewhere.
        for p in [p for p in self._in_place if p == path or p.startswith(path + b"/")]:
            del self._in_place[p]

    def _dirname(self, path: bytes) -> bytes:
        return path.rpartition(b"/")[0]

    # -- applying
    def apply(self, rec: Record) -> None:
        """Apply one record. Raises OSError for real failures (ENOSPC, EIO...) and
        RecordRefused (UnsafePath for a path that would leave the root) for a record that
        cannot be applied as it stands; nothing else."""
        handler = getattr(self, "_op_" + rec.op.name.lower())
        if rec.op in _ID_OPS:
            self._ids(rec)  # refused before anything is done
        with self._lock:
            try:
                handler(rec)
            except RecordRefused:
                raise
            except beneath.UnsafePath as e:
                raise UnsafePath(*e.args) from e
            except D.DeltaError as e:
                raise DeltaRefused(f"{rec.op.name} {rec.path!r}: {e}") from e
            except (ValueError, OverflowError, RecursionError) as e:
                # A value no system call takes, a malformed or stray delta (checked fields
                # say which; this is the net): one refusal type for all.
                raise RecordRefused(f"{rec.op.name} {rec.path!r}: {e}") from e
            if rec.seq:
                self.applied_seq = rec.seq

    @staticmethod
    def _ids(r: Record) -> tuple[int, int]:
        """(uid, gid) for chown, -1 where unchanged; a value out of range refuses the record."""
        out = []
        for field, v in (("uid", r.uid), ("gid", r.gid)):
            if v == ID_UNCHANGED:
                out.append(-1)
                continue
            if v != -1 and not 0 <= v < ID_UNCHANGED:
                raise RecordRefused(
                    f"{r.op.name} {r.path!r}: {field} {v} out of range (0..{ID_UNCHANGED - 1}, "
                    "or -1: unchanged)"
                )
            out.append(v)
        return out[0], out[1]

    def _make_room(
        self, pfd: int, name: bytes, path: bytes, keep: Callable[[os.stat_result], bool]
    ) -> bool:
        """True if ``name`` holds something ``keep`` accepts; else remove whatever it holds
        (a directory with its tree) and return False."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if keep(st):
            return True
        # A delta in progress for a name here is kept, as for a rename or an unlink: its
        # next piece must not fail a full resync (the incremental pass repairs the name).
        self._retire_under(path)
        if stat.S_ISDIR(st.st_mode):
            _rmtree_at(pfd, name)
        else:
            os.unlink(name, dir_fd=pfd)
        self._dirty_dirs.add(self._dirname(path))
        return False

    def _op_write(self, r: Record) -> None:
        fd = self._file(r.path)
        mv = memoryview(r.data)
        off = r.offset
        while mv:
            n = os.pwrite(fd, mv, off)
            mv = mv[n:]
            off += n
        self._dirty_files.add(r.path)

    def _op_truncate(self, r: Record) -> None:
        os.ftruncate(self._file(r.path), r.offset)
        self._dirty_files.add(r.path)

    def _op_fallocate(self, r: Record) -> None:
        fd = self._file(r.path)
        if r.mode == 0:
            os.posix_fallocate(fd, r.offset, r.length)
        else:
            fallocate(fd, r.mode, r.offset, r.length)
        self._dirty_files.add(r.path)

    def _owner(self, pfd: int, name: bytes, r: Record) -> None:
        uid, gid = self._ids(r)
        if uid >= 0 or gid >= 0:
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)

    def _op_create(self, r: Record) -> None:
        uid, gid = self._ids(r)
        self._retire(r.path)
        self._in_place.pop(r.path, None)
        pfd, name = self._parent(r.path)
        try:
            self._make_room(pfd, name, r.path, lambda st: stat.S_ISREG(st.st_mode))
        finally:
            self._done(pfd)
        fd = self._file(r.path, create_mode=r.mode & 0o7777)
        os.fchmod(fd, r.mode & 0o7777)
        if uid >= 0 or gid >= 0:
            os.fchown(fd, uid, gid)
        self._dirty_files.add(r.path)
        self._dirty_dirs.add(self._dirname(r.path))

    def _op_mknod(self, r: Record) -> None:
        self._ids(r)
        kind = stat.S_IFMT(r.mode)
        device = kind in (stat.S_IFCHR, stat.S_IFBLK)

        def same(st: os.stat_result) -> bool:
            return stat.S_IFMT(st.st_mode) == kind and (not device or st.st_rdev == r.rdev)

        pfd, name = self._parent(r.path)
        try:
            if not self._make_room(pfd, name, r.path, same):
                os.mknod(name, r.mode, r.rdev, dir_fd=pfd)
            self._owner(pfd, name, r)
        finally:
            self._done(pfd)
        self._dirty_dirs.add(self._dirname(r.path))

    def _op_mkdir(self, r: Record) -> None:
        self._ids(r)
        pfd, name = self._parent(r.path)
        try:
            if not self._make_room(pfd, name, r.path, lambda st: stat.S_ISDIR(st.st_mode)):
                os.mkdir(name, r.mode & 0o7777, dir_fd=pfd)
            os.chmod(name, r.mode & 0o7777, dir_fd=pfd)
            self._owner(pfd, name, r)
        finally:
            self._done(pfd)
        self._dirty_dirs.add(self._dirname(r.path))
        self._dirty_dirs.add(r.path)

    def _op_unlink(self, r: Record) -> None:
        # Whatever is there goes, a whole tree included: the primary removed this name (a
        # directory here is a copy that diverged; a resync's UNLINK says so outright).
        self._retire_under(r.path)
        self._in_place.pop(r.path, None)
        self._dirty_files.discard(r.path)
        try:
            pfd, name = self._parent(r.path)
        except (FileNotFoundError, NotADirectoryError):
            if not r.flags & 1:
                raise
            return  # its parent is gone already: so is it (a resync removing a tree)
        try:
            self._make_room(pfd, name, r.path, lambda st: False)
        finally:
            self._done(pfd)
        self._dirty_dirs.add(self._dirname(r.path))

    def _op_rmdir(self, r: Record) -> None:
        self._retire_under(r.path)
        pfd, name = self._parent(r.path)
        try:
            # The primary's directory was empty: anything here (in it, or of another type)
            # is a difference of this copy.
            self._make_room(pfd, name, r.path, lambda st: False)
        finally:
            self._done(pfd)
        self._dirty_dirs.add(self._dirname(r.path))

    def _op_rename(self, r: Record) -> None:
        self._retire_under(r.path)
        self._retire_under(r.path2)
        sfd, sname = self._parent(r.path)
        try:
            dfd, dname = self._parent(r.path2)
            try:
                self._rename(r, sfd, sname, dfd, dname)
            finally:
                self._done(dfd)
        finally:
            self._done(sfd)
        self._dirty_dirs.update((self._dirname(r.path), self._dirname(r.path2)))

    def _rename(self, r: Record, sfd: int, sname: bytes, dfd: int, dname: bytes) -> None:
        def once() -> None:
            if r.flags:
                renameat2(sfd, sname, dfd, dname, r.flags)
            else:
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)

        try:
            once()
        except FileNotFoundError:
            # replay: already renamed if the target exists
            os.stat(dname, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            nested = r.path2.startswith(r.path + b"/") or r.path.startswith(r.path2 + b"/")
            if e.errno not in _RENAME_TYPE_ERRORS or r.flags & _RENAME_EXCHANGE or nested:
                raise
            # The primary's target was absent or of a kind rename replaces: what is here
            # differs (another type, a non-empty directory). The source must exist.
            os.stat(sname, dir_fd=sfd, follow_symlinks=False)
            self._make_room(dfd, dname, r.path2, lambda st: False)
            once()

    def _op_symlink(self, r: Record) -> None:
        self._ids(r)

        def same(st: os.stat_result) -> bool:
            return stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=pfd) == r.path2

        pfd, name = self._parent(r.path)
        try:
            if not self._make_room(pfd, name, r.path, same):
                os.symlink(r.path2, name, dir_fd=pfd)
            self._owner(pfd, name, r)
        finally:
            self._done(pfd)
        self._dirty_dirs.add(self._dirname(r.path))

    def _op_link(self, r: Record) -> None:
        sfd, sname = self._parent(r.path)
        try:
            dfd, dname = self._parent(r.path2)
            try:
                try:
                    os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                except FileExistsError:
                    src = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
                    if stat.S_ISDIR(src.st_mode):  # never linked: keep what is there
                        raise OSError(errno.EPERM, "hard link to a directory", r.path) from None

                    def same(st: os.stat_result) -> bool:
                        return (st.st_dev, st.st_ino) == (src.st_dev, src.st_ino)

                    # The primary's new name was free: anything else here goes (replay: the
                    # same inode is already linked).
                    if not self._make_room(dfd, dname, r.path2, same):
                        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            finally:
                self._done(dfd)
        finally:
            self._done(sfd)
        self._dirty_dirs.add(self._dirname(r.path2))

    def _op_setattr(self, r: Record) -> None:
        if r.path == b"":
            pfd, name, fd_only = self.root_fd, b"", True
        else:
            pfd, name = self._parent(r.path)
            fd_only = False
        try:
            st = os.fstat(pfd) if fd_only else os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if r.flags & SET_SIZE:
                os.ftruncate(self._file(r.path), r.offset)
                self._dirty_files.add(r.path)
            ids = self._ids(r)
            if fd_only:
                set_attributes(r, st, pfd, ids=ids)
            else:
                set_attributes(r, st, name, pfd, ids=ids)
        finally:
            if not fd_only:
                self._done(pfd)
        self._dirty_dirs.add(self._dirname(r.path) if r.path else b"")

    def _xattr_target(self, path: bytes) -> tuple[int, str]:
        if path == b"":
            return -1, f"/proc/self/fd/{self.root_fd}"
        pfd, name = self._parent(path)
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        finally:
            self._done(pfd)
        return fd, f"/proc/self/fd/{fd}"

    def _op_setxattr(self, r: Record) -> None:
        if r.flags & ~_XATTR_FLAGS:
            raise RecordRefused(f"SETXATTR {r.path!r}: flags {r.flags:#x} (XATTR_CREATE|REPLACE)")
        fd, target = self._xattr_target(r.path)
        try:
            os.setxattr(target, r.name, r.data, r.flags)
        finally:
            if fd >= 0:
                os.close(fd)
        self._dirty_dirs.add(self._dirname(r.path) if r.path else b"")

    def _op_removexattr(self, r: Record) -> None:
        fd, target = self._xattr_target(r.path)
        try:
            os.removexattr(target, r.name)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
        finally:
            if fd >= 0:
                os.close(fd)

    def _op_fsync(self, r: Record) -> None:
        self._barrier(datasync=bool(r.flags & FSYNC_DATA))
        if r.seq:
            self.durable_seq = r.seq

    def _replace_with(
        self, path: bytes, content: D.Delta | bytes | memoryview, more: bool = False
    ) -> None:
        """Write the new content beside the file; with ``more`` keep it open for the next
        pieces, else fsync it and rename it over (atomic)."""
        self._retire(path)
        pfd, name = self._parent(path)
        try:
            fd = self._deltas.pop(path, -1)
            if fd < 0:
                # A regular file replaces whatever else holds the name (no basis then).
                self._make_room(pfd, name, path, lambda st: stat.S_ISREG(st.st_mode))
                fd = self._staging.create(pfd)  # anonymous: never an application's name
            try:
                if isinstance(content, D.Delta):
                    self._patch_into(pfd, name, content, fd)
                else:
                    os.write(fd, content)
                if more:
                    _start_writeback(fd)
                    self._deltas[path] = fd
                    fd = -1
                    return
                try:
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                    os.fchmod(fd, st.st_mode & 0o7777)
                    os.fchown(fd, st.st_uid, st.st_gid)
                except FileNotFoundError:
                    pass
                os.fsync(fd)
                self._staging.commit(fd, pfd, name)
            finally:
                if fd >= 0:
                    os.close(fd)
        finally:
            self._done(pfd)
        self._dirty_dirs.add(self._dirname(path))

    def _patch_into(self, pfd: int, name: bytes, d: D.Delta, out: int) -> None:
        try:
            bfd = open_file(name, pfd)  # a FIFO here must not block the worker
        except FileNotFoundError:
            bfd = -1
        try:
            basis: mmap.mmap | bytes = b""
            if bfd >= 0 and os.fstat(bfd).st_size:
                basis = mmap.mmap(bfd, 0, prot=mmap.PROT_READ)
            try:
                for chunk in D.iter_patch(basis, d):
                    mv = memoryview(chunk)
                    while mv:
                        mv = mv[os.write(out, mv) :]
                    del mv, chunk
            finally:
                if isinstance(basis, mmap.mmap):
                    with contextlib.suppress(BufferError):
                        basis.close()
        finally:
            if bfd >= 0:
                os.close(bfd)

    def _op_delta(self, r: Record) -> None:
        d = D.Delta.decode(r.data)
        if r.flags & DELTA_IN_PLACE and self._patches_in_place(r):
            self._delta_in_place(r, d)
            return
        self._in_place.pop(r.path, None)
        open_fd = self._deltas.get(r.path)
        if r.flags & DELTA_CONT:
            # A piece whose start was never seen (or at another offset) cannot be placed.
            if open_fd is None or os.lseek(open_fd, 0, os.SEEK_CUR) != r.offset:
                self._abandon_delta(r.path)
                raise D.DeltaError("delta piece out of sequence")
        elif open_fd is not None:
            self._abandon_delta(r.path)  # a new delta restarts the file
        self._replace_with(r.path, d, more=bool(r.flags & DELTA_MORE))

    def _patches_in_place(self, r: Record) -> bool:
        """An in-place delta is patched in place unless the file has other names (they are
        separate files on the primary: a new file breaks the link) or its first piece began
        the other way."""
        if r.flags & DELTA_CONT:
            return r.path in self._in_place
        try:
            return os.fstat(self._file(r.path)).st_nlink == 1
        except OSError:
            return False  # missing or not a file: rebuilt beside, as any delta

    def _delta_in_place(self, r: Record, d: D.Delta) -> None:
        """The literals written over the file itself; the last piece sets its length. A
        resync cut short leaves it part old, part new, as ranges written by an incremental
        resync do: the copy is not declared in sync before the resync's end."""
        # Open again below only if this piece applies and more follow.
        expected = self._in_place.pop(r.path, None)
        if not r.flags & DELTA_CONT:
            self._abandon_delta(r.path)  # a new delta restarts the file
            expected = 0
        if r.offset != expected:
            raise D.DeltaError("delta piece out of sequence")
        fd = self._file(r.path)
        try:
            end = D.patch_in_place(fd, d, r.offset)
            if not r.flags & DELTA_MORE:
                os.ftruncate(fd, end)
        finally:
            self._dirty_files.add(r.path)
        if r.flags & DELTA_MORE:
            self._in_place[r.path] = end

    def _abandon_delta(self, path: bytes) -> None:
        fd = self._deltas.pop(path, None)
        if fd is not None:
            self._staging.discard(fd)

    def _op_batch(self, r: Record) -> None:
        """A resync's records in one (``batch``), applied in order, in one go (the secondary
        runs a large one in a worker thread). The first that fails stops it: those before it
        stay applied, as records before a refused one do, and the resync starts over."""
        for i, sub in enumerate(batch.entries(r.data)):
            if sub.op in _ID_OPS:
                self._ids(sub)
            try:
                getattr(self, "_op_" + sub.op.name.lower())(sub)
            except OSError as e:
                where = f"batch entry {i}: {sub.op.name} {sub.path!r}"
                raise OSError(e.errno, f"{e.strerror} ({where})") from e

    def _op_replace(self, r: Record) -> None:
        self._abandon_delta(r.path)  # a delta cut short: this is the whole file, not a piece
        self._replace_with(r.path, r.data)

    # -- durability
    def barrier(self, datasync: bool = False) -> None:
        with self._lock:
            self._barrier(datasync)

    def _barrier(self, datasync: bool) -> None:
        if len(self._dirty_files) + len(self._pending) > SYNCFS_OVER:
            self._barrier_syncfs()
            return
        sync = os.fdatasync if datasync else os.fsync
        for p in list(self._dirty_files):
            fd = self._files.get(p)
            if fd is not None:
                sync(fd)
        for fd in self._pending:
            sync(fd)
            os.close(fd)
        self._pending.clear()
        self._dirty_files.clear()
        for d in sorted(self._dirty_dirs):
            try:
                if d == b"":
                    os.fsync(self.root_fd)
                    continue
                pfd, name = self._parent(d)
                try:
                    dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
                finally:
                    self._done(pfd)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except (FileNotFoundError, NotADirectoryError):
                continue
        self._dirty_dirs.clear()
        self.durable_seq = self.applied_seq

    def _barrier_syncfs(self) -> None:
        """The barrier of many files at once (a resync): one syncfs of the backing file
        system, one journal commit and cache flush, where one fsync per file cost one each
        (576 files: ~1.5 s on the lab's loop-mounted disks). Anything dirty on another file
        system (a mount under the root) still gets its own fsync."""
        dev = os.fstat(self.root_fd).st_dev
        fds = [self._files[p] for p in self._dirty_files if p in self._files] + self._pending
        others = [fd for fd in fds if os.fstat(fd).st_dev != dev]
        dir_fds: list[int] = []
        try:
            for d in sorted(self._dirty_dirs - {b""}):
                try:
                    pfd, name = self._parent(d)
                    try:
                        dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
                    finally:
                        self._done(pfd)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                dir_fds.append(dfd)
                if os.fstat(dfd).st_dev != dev:
                    others.append(dfd)
            if libc.syncfs(self.root_fd) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            for fd in others:
                os.fsync(fd)
        finally:
            for fd in dir_fds:
                os.close(fd)
        for fd in self._pending:
            os.close(fd)
        self._pending.clear()
        self._dirty_files.clear()
        self._dirty_dirs.clear()
        self.durable_seq = self.applied_seq


_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages back, without waiting (best effort: the fsync
    that follows is what makes it durable). A delta rebuilds a large file piece by piece in
    the secondary's event loop; left to its last piece, the fsync of 1 GiB took 2.2 s on a
    loop disk, past the link timeout, and the full resync started again from the start."""
    libc.sync_file_range(
        ctypes.c_int(fd),
        ctypes.c_int64(0),
        ctypes.c_int64(0),
        ctypes.c_uint(_SYNC_FILE_RANGE_WRITE),
    )


def _rmtree_at(pfd: int, name: bytes) -> None:
    """Remove directory ``name`` under ``pfd`` and everything in it, never following a
    symlink or crossing into another file system. No recursion (renames can nest a tree
    deeper than any path, and than Python's stack) and two descriptors open at most: the
    walk climbs back through "..", checked to be the directory it came from."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    try:
        st = os.fstat(fd)
        dev = st.st_dev
        # Each directory entered, top first: (its name in its parent, inode, subdirectories
        # still to remove).
        stack: list[tuple[bytes, int, list[bytes]]] = [(name, st.st_ino, _remove_files(fd))]
        while True:
            _, _, subs = stack[-1]
            if subs:
                sub = subs.pop()
                nfd = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                nst = os.fstat(nfd)
                if nst.st_dev != dev:
                    os.close(nfd)
                    raise OSError(errno.EXDEV, "a mount point inside a tree to remove", sub)
                os.close(fd)
                fd = nfd
                stack.append((sub, nst.st_ino, _remove_files(fd)))
                continue
            done, _, _ = stack.pop()
            if not stack:
                break
            parent = os.open(b"..", _DIR_FLAGS, dir_fd=fd)
            pst = os.fstat(parent)
            if (pst.st_dev, pst.st_ino) != (dev, stack[-1][1]):
                os.close(parent)
                raise OSError(errno.ESTALE, "a directory moved while its tree was removed", done)
            os.close(fd)
            fd = parent
            os.rmdir(done, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=pfd)


def _remove_files(dfd: int) -> list[bytes]:
    """Unlink everything in the directory but its subdirectories; return their names."""
    subs: list[bytes] = []
    with os.scandir(dfd) as it:
        entries = list(it)
    for e in entries:
        n = os.fsencode(e.name)
        if e.is_dir(follow_symlinks=False):
            subs.append(n)
        else:
            os.unlink(n, dir_fd=dfd)
    return subs
