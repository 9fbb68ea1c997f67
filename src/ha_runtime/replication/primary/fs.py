"""pyfuse3 passthrough file system: the application directory on the primary.

Every call passes through to the backing directory. Every mutating call becomes a journal
``Record`` handed to a ``Sink`` in two steps: ``before(rec)`` (while ALONE: the dirty log
records it and is fsync'd *before* the backing directory changes) and ``after(rec)`` (while
in sync: the record is queued to the peer, in the order the operations completed).
``fsync``/``fdatasync``, writes on ``O_SYNC``/``O_DSYNC`` handles and the last release of
such a handle call ``sink.barrier(path)``, which returns only once the peer acknowledged
(or, ALONE, once the dirty log and the local file are durable). See docs/replication.md.

Inode numbers are the backing files' own. pyfuse3 serves one mount per process.

Long because: one pyfuse3 Operations class, one method per FUSE call.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyfuse3
import trio

from ha_runtime.replication.fsops import AT_FDCWD, renameat2, set_attributes
from ha_runtime.replication.journal import (
    SET_ATIME,
    SET_GID,
    SET_MODE,
    SET_MTIME,
    SET_SIZE,
    SET_UID,
    Op,
    Record,
)


class Sink(Protocol):
    async def before(self, rec: Record) -> None: ...
    def after(self, rec: Record) -> None: ...
    async def barrier(self, path: bytes, datasync: bool) -> None: ...


@dataclass
class _Handle:
    fd: int
    inode: int
    sync: bool
    written: bool = False


# The kernel asks for this attribute before every write to a file (to drop file
# capabilities; FUSE_HANDLE_KILLPRIV, which would spare it, cannot be set through pyfuse3).
_CAPS = b"security.capability"


def fsync_backing(backing: bytes, path: bytes, datasync: bool) -> None:
    """Make ``path`` under the backing directory (b"" for the directory itself) durable on
    this node: a barrier's local half. A path gone meanwhile has nothing left to sync."""
    p = backing + (b"/" + path if path else b"")
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        (os.fdatasync if datasync else os.fsync)(fd)
    finally:
        os.close(fd)


def _attributes(ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.generation = 0
    a.entry_timeout = 0
    a.attr_timeout = 0
    for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size"):
        setattr(a, f, getattr(st, f))
    a.st_blksize = st.st_blksize
    a.st_blocks = st.st_blocks
    a.st_atime_ns = st.st_atime_ns
    a.st_mtime_ns = st.st_mtime_ns
    a.st_ctime_ns = st.st_ctime_ns
    return a


def _fuse_error(e: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e.errno or errno.EIO)


class PassthroughFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, backing: Path, sink: Sink) -> None:
        super().__init__()
        self.backing = os.fsencode(backing.resolve())
        self.sink = sink
        self._paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: b""}
        self._lookups: dict[int, int] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        # Inodes known to have no security.capability: answered without a system call. Only
        # this file system changes the backing directory, and its setxattr forgets the inode.
        self._no_caps: set[int] = set()
        # Open files whose last name was removed (unlinked, or renamed over): the application
        # keeps using them through their descriptors (temp files, SQLite's among them). They
        # have no path any more, and their old name may soon hold another file, so they are
        # served through the descriptor and never replicated: no copy can see them.
        self._orphans: set[int] = set()

    # -- paths
    def _rel(self, inode: int) -> bytes:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _abs(self, rel: bytes) -> bytes:
        return self.backing + b"/" + rel if rel else self.backing

    def _child(self, parent: int, name: bytes) -> bytes:
        p = self._rel(parent)
        return p + b"/" + name if p else name

    def _attr(self, rel: bytes) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(self._abs(rel))
        except OSError as e:
            raise _fuse_error(e) from None
        ino = pyfuse3.ROOT_INODE if rel == b"" else st.st_ino
        self._paths[ino] = rel
        return _attributes(ino, st)

    # -- open files without a name
    def _fd_of(self, inode: int) -> int | None:
        for h in self._handles.values():
            if h.inode == inode:
                return h.fd
        return None

    def _orphan_if_open(self, inode: int | None) -> None:
        """After a name was removed: an open file it was the last name of is an orphan."""
        fd = None if inode is None else self._fd_of(inode)
        if inode is not None and fd is not None and os.fstat(fd).st_nlink == 0:
            self._orphans.add(inode)

    def _orphan_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        fd = self._fd_of(inode)
        if fd is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return _attributes(inode, os.fstat(fd))

    def _ino_at(self, rel: bytes) -> int | None:
        try:
            return os.lstat(self._abs(rel)).st_ino
        except OSError:
            return None

    def _orphan_setattr(self, inode: int, attr: Any, fields: Any) -> pyfuse3.EntryAttributes:
        fd = self._fd_of(inode)
        if fd is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            if fields.update_size:
                os.ftruncate(fd, attr.st_size)
            if fields.update_mode:
                os.fchmod(fd, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                os.fchown(fd, uid, attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                st = os.fstat(fd)
                a = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                m = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                os.utime(fd, ns=(a, m))
        except OSError as e:
            raise _fuse_error(e) from None
        return self._orphan_attr(inode)

    def _entry(self, rel: bytes) -> pyfuse3.EntryAttributes:
        a = self._attr(rel)
        self._lookups[a.st_ino] = self._lookups.get(a.st_ino, 0) + 1
        return a

    async def _mutate(self, rec: Record, fn: Any, *args: Any) -> Any:
        try:
            # Recording it may fail too (a full disk under the dirty or activity log): then
            # the operation is not performed and the application gets the error.
            await self.sink.before(rec)
            result = fn(*args)
        except OSError as e:
            raise _fuse_error(e) from None
        self.sink.after(rec)
        return result

    # -- lookups and attributes
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if name == b".":
            return self._entry(self._rel(parent_inode))
        if name == b"..":
            return self._entry(self._rel(parent_inode).rpartition(b"/")[0])
        return self._entry(self._child(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            left = self._lookups.get(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
            else:
                self._lookups.pop(ino, None)
                self._no_caps.discard(ino)
                if ino != pyfuse3.ROOT_INODE and self._fd_of(ino) is None:
                    self._paths.pop(ino, None)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        if inode in self._orphans:
            return self._orphan_attr(inode)
        return self._attr(self._rel(inode))

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        if inode in self._orphans:
            return self._orphan_setattr(inode, attr, fields)
        rel = self._rel(inode)
        p = self._abs(rel)
        flags = 0
        r: dict[str, Any] = {}
        if fields.update_size:
            flags |= SET_SIZE
            r["offset"] = attr.st_size
        if fields.update_mode:
            flags |= SET_MODE
            r["mode"] = attr.st_mode
        if fields.update_uid:
            flags |= SET_UID
            r["uid"] = attr.st_uid
        if fields.update_gid:
            flags |= SET_GID
            r["gid"] = attr.st_gid
        if fields.update_atime:
            flags |= SET_ATIME
            r["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            flags |= SET_MTIME
            r["mtime_ns"] = attr.st_mtime_ns
        if not flags:
            return self._attr(rel)
        if flags & SET_SIZE:
            await self._mutate(
                Record(0, Op.TRUNCATE, rel, offset=attr.st_size), os.truncate, p, attr.st_size
            )
            flags &= ~SET_SIZE
        if flags:
            rec = Record(
                0, Op.SETATTR, rel, flags=flags, **{k: v for k, v in r.items() if k != "offset"}
            )
            await self._mutate(rec, self._do_setattr, p, rec)
        return self._attr(rel)

    @staticmethod
    def _do_setattr(p: bytes, r: Record) -> None:
        set_attributes(r, os.lstat(p), p)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        try:
            return os.readlink(self._abs(self._rel(inode)))
        except OSError as e:
            raise _fuse_error(e) from None

    async def statfs(self, ctx: Any) -> Any:
        sv = os.statvfs(self.backing)
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(out, f, getattr(sv, f))
        for f in ("f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, f, getattr(sv, f))
        return out

    # -- directories
    async def opendir(self, inode: int, ctx: Any) -> int:
        self._rel(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        rel = self._rel(fh)
        try:
            names = sorted(os.listdir(self._abs(rel)))
        except OSError as e:
            raise _fuse_error(e) from None
        for i, n in enumerate(names[start_id:], start=start_id):
            child = rel + b"/" + n if rel else n
            try:
                a = self._attr(child)
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, n, a, i + 1):
                break
            self._lookups[a.st_ino] = self._lookups.get(a.st_ino, 0) + 1

    async def releasedir(self, fh: int) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.sink.barrier(self._rel(fh), datasync)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        rel = self._child(parent_inode, name)
        p = self._abs(rel)

        def do() -> None:
            os.mkdir(p, stat.S_IMODE(mode) & ~ctx.umask)
            os.chown(p, ctx.uid, ctx.gid)

        rec = Record(
            0, Op.MKDIR, rel, mode=(mode & ~ctx.umask) | stat.S_IFDIR, uid=ctx.uid, gid=ctx.gid
        )
        await self._mutate(rec, do)
        return self._entry(rel)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        rel = self._child(parent_inode, name)
        await self._mutate(Record(0, Op.RMDIR, rel), os.rmdir, self._abs(rel))

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        rel = self._child(parent_inode, name)
        ino = self._ino_at(rel)
        await self._mutate(Record(0, Op.UNLINK, rel), os.unlink, self._abs(rel))
        self._orphan_if_open(ino)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        rel = self._child(parent_inode, name)
        p = self._abs(rel)
        m = (mode & ~ctx.umask & 0o7777) | stat.S_IFMT(mode)

        def do() -> None:
            os.mknod(p, m, rdev)
            os.chown(p, ctx.uid, ctx.gid, follow_symlinks=False)

        await self._mutate(
            Record(0, Op.MKNOD, rel, mode=m, rdev=rdev, uid=ctx.uid, gid=ctx.gid), do
        )
        return self._entry(rel)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        rel = self._child(parent_inode, name)
        p = self._abs(rel)

        def do() -> None:
            os.symlink(target, p)
            os.chown(p, ctx.uid, ctx.gid, follow_symlinks=False)

        await self._mutate(Record(0, Op.SYMLINK, rel, path2=target, uid=ctx.uid, gid=ctx.gid), do)
        return self._entry(rel)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        src = self._rel(inode)
        dst = self._child(new_parent_inode, new_name)
        await self._mutate(
            Record(0, Op.LINK, src, path2=dst), os.link, self._abs(src), self._abs(dst),
        )  # fmt: skip
        return self._entry(dst)

    async def rename(  # noqa: PLR0917 (pyfuse3's signature)
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
        flags: int, ctx: Any,
    ) -> None:  # fmt: skip
        src = self._child(parent_inode_old, name_old)
        dst = self._child(parent_inode_new, name_new)
        if flags:

            def do() -> None:
                renameat2(AT_FDCWD, self._abs(src), AT_FDCWD, self._abs(dst), flags)
        else:

            def do() -> None:
                os.rename(self._abs(src), self._abs(dst))

        replaced = self._ino_at(dst)
        await self._mutate(Record(0, Op.RENAME, src, path2=dst, flags=flags), do)
        if replaced != self._ino_at(dst):
            self._orphan_if_open(replaced)
        for ino, rel in list(self._paths.items()):
            if rel == src or rel.startswith(src + b"/"):
                self._paths[ino] = dst + rel[len(src) :]

    # -- xattrs
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        rel = self._rel(inode)
        await self._mutate(
            Record(0, Op.SETXATTR, rel, name=name, data=value),
            lambda: os.setxattr(self._abs(rel), name, value, 0, follow_symlinks=False),
        )
        self._no_caps.discard(inode)  # after: a getxattr may have run while before() waited

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        caps = name == _CAPS
        if caps and inode in self._no_caps:
            raise pyfuse3.FUSEError(errno.ENODATA)
        try:
            return os.getxattr(self._abs(self._rel(inode)), name, follow_symlinks=False)
        except OSError as e:
            if caps and e.errno == errno.ENODATA:
                self._no_caps.add(inode)
            raise _fuse_error(e) from None

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        try:
            return [
                os.fsencode(n)
                for n in os.listxattr(self._abs(self._rel(inode)), follow_symlinks=False)
            ]
        except OSError as e:
            raise _fuse_error(e) from None

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        rel = self._rel(inode)
        await self._mutate(
            Record(0, Op.REMOVEXATTR, rel, name=name),
            lambda: os.removexattr(self._abs(rel), name, follow_symlinks=False),
        )

    # -- files
    def _new_handle(self, fd: int, inode: int, flags: int) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(fd, inode, bool(flags & (os.O_SYNC | os.O_DSYNC)))
        fi = pyfuse3.FileInfo(fh=fh)
        fi.direct_io = False
        fi.keep_cache = False
        return fi

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        rel = self._rel(inode)
        if flags & os.O_TRUNC:
            await self._mutate(Record(0, Op.TRUNCATE, rel, offset=0), lambda: None)
        try:
            fd = os.open(self._abs(rel), flags & ~(os.O_CREAT | os.O_EXCL) | os.O_NOFOLLOW)
        except OSError as e:
            raise _fuse_error(e) from None
        return self._new_handle(fd, inode, flags)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        rel = self._child(parent_inode, name)
        p = self._abs(rel)
        m = (mode & ~ctx.umask & 0o7777) | stat.S_IFREG
        fds: list[int] = []

        def do() -> None:
            fd = os.open(p, (flags | os.O_CREAT) & ~os.O_NOCTTY | os.O_NOFOLLOW, m & 0o7777)
            fds.append(fd)
            os.fchown(fd, ctx.uid, ctx.gid)
            os.fchmod(fd, m & 0o7777)

        await self._mutate(Record(0, Op.CREATE, rel, mode=m, uid=ctx.uid, gid=ctx.gid), do)
        attr = self._entry(rel)
        return self._new_handle(fds[0], attr.st_ino, flags), attr

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return os.pread(self._handles[fh].fd, size, off)
        except OSError as e:
            raise _fuse_error(e) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handles[fh]
        if h.inode in self._orphans:
            try:
                return os.pwrite(h.fd, buf, off)
            except OSError as e:
                raise _fuse_error(e) from None
        rel = self._rel(h.inode)
        n = await self._mutate(
            Record(0, Op.WRITE, rel, offset=off, data=bytes(buf)), os.pwrite, h.fd, buf, off
        )
        h.written = True
        if h.sync:
            await self.sink.barrier(rel, True)
        return int(n)

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handles[fh]
        if h.inode in self._orphans:
            sync = os.fdatasync if datasync else os.fsync
            await trio.to_thread.run_sync(sync, h.fd)
            return
        await self.sink.barrier(self._rel(h.inode), datasync)

    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh)
        orphan = h.inode in self._orphans
        try:
            if h.sync and h.written and not orphan:
                await self.sink.barrier(self._paths.get(h.inode, b""), True)
        finally:
            os.close(h.fd)
            if orphan and self._fd_of(h.inode) is None:
                # Gone with its last descriptor: the inode number may name a new file next.
                self._orphans.discard(h.inode)


async def serve(
    *,
    backing: Path, mountpoint: Path, sink: Sink, fsname: str, debug: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:  # fmt: skip
    """Mount and serve until cancelled, then unmount."""
    fs = PassthroughFS(backing, sink)
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={fsname}", "allow_other", "subtype=hapair"}
    if debug:
        opts.add("debug")
    pyfuse3.init(fs, str(mountpoint), opts)
    try:
        task_status.started()
        await pyfuse3.main()
    finally:
        pyfuse3.close(unmount=True)
