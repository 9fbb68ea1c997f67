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
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
from pathlib import Path

from ha_runtime.replication import beneath
from ha_runtime.replication import delta as D
from ha_runtime.replication.beneath import open_file, open_parent
from ha_runtime.replication.journal import (
    DELTA_CONT,
    DELTA_IN_PLACE,
    DELTA_MORE,
    FSYNC_DATA,
    SET_ATIME,
    SET_GID,
    SET_MODE,
    SET_MTIME,
    SET_SIZE,
    SET_UID,
    Record,
)
from ha_runtime.replication.staging import Staging

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
AT_FDCWD = -100
# A barrier with more dirty files than this syncs the file system once (syncfs) instead of
# each file: a live fsync touches one or a few files, a resync hundreds.
SYNCFS_OVER = 8
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def renameat2(sfd: int, src: bytes, dfd: int, dst: bytes, flags: int) -> None:
    if _libc.renameat2(sfd, src, dfd, dst, ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    r = _libc.fallocate(fd, ctypes.c_int(mode), ctypes.c_long(offset), ctypes.c_long(length))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


UnsafePath = beneath.UnsafePath


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

    def close(self) -> None:
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
        UnsafePath for a path that would leave the root (never applied)."""
        handler = getattr(self, "_op_" + rec.op.name.lower())
        handler(rec)
        if rec.seq:
            self.applied_seq = rec.seq

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
        if r.uid >= 0 or r.gid >= 0:
            os.chown(name, r.uid, r.gid, dir_fd=pfd, follow_symlinks=False)

    def _op_create(self, r: Record) -> None:
        self._retire(r.path)
        self._in_place.pop(r.path, None)
        fd = self._file(r.path, create_mode=r.mode & 0o7777)
        os.fchmod(fd, r.mode & 0o7777)
        if r.uid >= 0 or r.gid >= 0:
            os.fchown(fd, r.uid, r.gid)
        self._dirty_files.add(r.path)
        self._dirty_dirs.add(self._dirname(r.path))

    def _op_mknod(self, r: Record) -> None:
        pfd, name = self._parent(r.path)
        try:
            try:
                os.mknod(name, r.mode, r.rdev, dir_fd=pfd)
            except FileExistsError:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_IFMT(st.st_mode) != stat.S_IFMT(r.mode):
                    raise
            self._owner(pfd, name, r)
        finally:
            self._done(pfd)
        self._dirty_dirs.add(self._dirname(r.path))

    def _op_mkdir(self, r: Record) -> None:
        pfd, name = self._parent(r.path)
        try:
            try:
                os.mkdir(name, r.mode & 0o7777, dir_fd=pfd)
            except FileExistsError:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise
            os.chmod(name, r.mode & 0o7777, dir_fd=pfd)
            self._owner(pfd, name, r)
        finally:
            self._done(pfd)
        self._dirty_dirs.add(self._dirname(r.path))
        self._dirty_dirs.add(r.path)

    def _op_unlink(self, r: Record) -> None:
        if r.flags & 1:  # resync: remove whatever is there, a whole tree included
            self._retire_under(r.path)
        else:
            self._retire(r.path)
        self._in_place.pop(r.path, None)
        self._dirty_files.discard(r.path)
        try:
            pfd, name = self._parent(r.path)
        except (FileNotFoundError, NotADirectoryError):
            if not r.flags & 1:
                raise
            return  # its parent is gone already: so is it (a resync removing a tree)
        try:
            os.unlink(name, dir_fd=pfd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            if not r.flags & 1:
                raise
            _rmtree_at(pfd, name)
        finally:
            self._done(pfd)
        self._dirty_dirs.add(self._dirname(r.path))

    def _op_rmdir(self, r: Record) -> None:
        self._retire_under(r.path)
        pfd, name = self._parent(r.path)
        try:
            os.rmdir(name, dir_fd=pfd)
        except FileNotFoundError:
            pass
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
                if r.flags:
                    renameat2(sfd, sname, dfd, dname, r.flags)
                else:
                    os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            except FileNotFoundError:
                # replay: already renamed if the target exists
                os.stat(dname, dir_fd=dfd, follow_symlinks=False)
            finally:
                self._done(dfd)
        finally:
            self._done(sfd)
        self._dirty_dirs.update((self._dirname(r.path), self._dirname(r.path2)))

    def _op_symlink(self, r: Record) -> None:
        pfd, name = self._parent(r.path)
        try:
            try:
                os.symlink(r.path2, name, dir_fd=pfd)
            except FileExistsError:
                if os.readlink(name, dir_fd=pfd) != r.path2:
                    os.unlink(name, dir_fd=pfd)
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
                os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            except FileExistsError:
                pass
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
            is_link = stat.S_ISLNK(st.st_mode)
            if r.flags & SET_SIZE:
                os.ftruncate(self._file(r.path), r.offset)
                self._dirty_files.add(r.path)
            if r.flags & (SET_UID | SET_GID):
                uid = r.uid if r.flags & SET_UID else -1
                gid = r.gid if r.flags & SET_GID else -1
                if fd_only:
                    os.fchown(pfd, uid, gid)
                else:
                    os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
            if r.flags & SET_MODE and not is_link:
                if fd_only:
                    os.fchmod(pfd, r.mode & 0o7777)
                else:
                    os.chmod(name, r.mode & 0o7777, dir_fd=pfd)
            if r.flags & (SET_ATIME | SET_MTIME):
                a = r.atime_ns if r.flags & SET_ATIME else st.st_atime_ns
                m = r.mtime_ns if r.flags & SET_MTIME else st.st_mtime_ns
                if fd_only:
                    os.utime(pfd, ns=(a, m))
                else:
                    os.utime(name, ns=(a, m), dir_fd=pfd, follow_symlinks=False)
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
        self.barrier(datasync=bool(r.flags & FSYNC_DATA))
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

    def _op_replace(self, r: Record) -> None:
        self._abandon_delta(r.path)  # a delta cut short: this is the whole file, not a piece
        self._replace_with(r.path, r.data)

    # -- durability
    def barrier(self, datasync: bool = False) -> None:
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
            if _libc.syncfs(self.root_fd) != 0:
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
    _libc.sync_file_range(
        ctypes.c_int(fd),
        ctypes.c_int64(0),
        ctypes.c_int64(0),
        ctypes.c_uint(_SYNC_FILE_RANGE_WRITE),
    )


def _rmtree_at(pfd: int, name: bytes) -> None:
    """Remove directory ``name`` under ``pfd`` and everything in it, never following links."""
    dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    try:
        for n in os.listdir(dfd):
            en = os.fsencode(n)
            st = os.stat(en, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _rmtree_at(dfd, en)
            else:
                os.unlink(en, dir_fd=dfd)
    finally:
        os.close(dfd)
    os.rmdir(name, dir_fd=pfd)
