"""Resolve and walk paths beneath a root directory without ever following a symlink.

The secondary's copy is written by its peer: any directory in it may have been replaced by a
symlink to ``/etc``. Every lookup the replicator makes there (applying records, answering
control requests, quarantining, digesting) goes through this module:

- a relative path is refused unless ``valid_path`` accepts it (no ``..``, ``.``, empty or
  absolute components, no NUL);
- each directory on the way is opened relative to its parent's descriptor, one syscall
  (``openat2`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``) or, where the kernel lacks it,
  component by component with ``O_NOFOLLOW | O_DIRECTORY``;
- the last component is then acted on relative to its parent's descriptor without following
  it (a symlink there is a symlink, never its target).

A symlink where a directory is expected is ``NotADirectoryError`` either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Iterator

from ha_runtime.replication.journal import MAX_PATH, valid_path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Reading a file someone else named: never follow, never block (a FIFO would), then fstat.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_SYS_OPENAT2 = 437  # same number on every architecture (new syscall table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
# Open descriptors a walk keeps along its current path; deeper ones are reopened on demand.
WALK_KEEP_FDS = 64


class UnsafePath(ValueError):
    """A path that would not stay beneath the root (never acted on)."""


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_have_openat2 = True


def _openat2_dir(dirfd: int, rel: bytes) -> int | None:
    """The directory ``rel`` beneath ``dirfd`` in one syscall; None: no openat2 here."""
    global _have_openat2  # noqa: PLW0603 - learnt once per process
    how = _OpenHow(DIR_FLAGS, 0, _RESOLVE)
    fd = _syscall(
        ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(rel),
        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
    )  # fmt: skip
    if fd >= 0:
        return int(fd)
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EPERM):  # old kernel, or a seccomp filter refusing it
        _have_openat2 = False
        return None
    if e == errno.ENAMETOOLONG:
        return None  # longer than PATH_MAX: the component walk has no such limit
    if e in (errno.ELOOP, errno.EXDEV):
        # A symlink (or a magic link) on the way: as the component walk reports it.
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
    raise OSError(e, os.strerror(e), rel)


def _walk_dir(dirfd: int, parts: list[bytes]) -> int:
    fd = dirfd
    try:
        for comp in parts:
            nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
            if fd != dirfd:
                os.close(fd)
            fd = nfd
    except BaseException:
        if fd != dirfd:
            os.close(fd)
        raise
    return fd if fd != dirfd else os.dup(dirfd)


def open_dir(dirfd: int, rel: bytes) -> int:
    """A new descriptor of directory ``rel`` beneath ``dirfd`` (``b""``: a duplicate)."""
    if not rel:
        return os.dup(dirfd)
    if not valid_path(rel):
        raise UnsafePath(rel)
    if _have_openat2:
        fd = _openat2_dir(dirfd, rel)
        if fd is not None:
            return fd
    return _walk_dir(dirfd, rel.split(b"/"))


def open_parent(dirfd: int, rel: bytes) -> tuple[int, bytes]:
    """(descriptor of the parent directory of ``rel``, last component). The caller closes
    the descriptor unless it is ``dirfd`` itself (a name directly under the root)."""
    if not valid_path(rel):
        raise UnsafePath(rel)
    head, _, name = rel.rpartition(b"/")
    return (open_dir(dirfd, head) if head else dirfd), name


def open_file(name: bytes | str | os.PathLike[str], dirfd: int | None = None) -> int:
    """Open regular file ``name`` (under ``dirfd``) for reading: a symlink is refused, a
    FIFO or device is never waited on (``OSError(EINVAL)`` for anything but a regular file)."""
    fd = os.open(name, READ_FLAGS, dir_fd=dirfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fsdecode(name))
    return fd


class DirPath:
    """Descriptors of the directories along one path beneath a root, reused from one lookup
    to the next (a walk's consecutive entries share most of their path). At most
    ``keep`` stay open: deeper trees close their shallower ones and reopen them when the
    walk comes back, so a hostile 10 000-level tree costs no more descriptors."""

    def __init__(self, root_fd: int, keep: int = WALK_KEEP_FDS) -> None:
        self.root_fd = root_fd
        self.keep = keep
        self._names: list[bytes] = []  # components of the current path
        self._fds: list[int] = []  # their descriptors, -1 when closed
        self._ends: list[int] = []  # len(self._cur) up to and including each component
        self._cur = b""  # b"/".join(self._names)
        self._open = 0  # descriptors open in _fds
        self._lo = 0  # every descriptor before this index is closed

    def _common(self, rel: bytes) -> int:
        """How many components of the current path ``rel`` starts with (binary search: a
        prefix that matches means every shorter one does)."""
        lo, hi = 0, len(self._names)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            end = self._ends[mid - 1]
            if rel[:end] == self._cur[:end] and (len(rel) == end or rel[end] == 0x2F):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def fd(self, rel: bytes) -> int:
        """The descriptor of directory ``rel`` (valid until the next call or ``close``)."""
        if not rel:
            self._truncate(0)
            return self.root_fd
        i = self._common(rel)
        self._truncate(i)
        start = self._ends[-1] + 1 if self._names else 0
        new = rel[start:].split(b"/") if len(rel) > start else []
        if not new and self._fds[-1] >= 0:
            return self._fds[-1]
        # From the deepest open ancestor: reopen the closed ones, then open the new ones.
        j = len(self._fds) - 1
        while j >= 0 and self._fds[j] < 0:
            j -= 1
        fd = self.root_fd if j < 0 else self._fds[j]
        for k in range(j + 1, len(self._fds)):
            fd = os.open(self._names[k], DIR_FLAGS, dir_fd=fd)
            self._fds[k] = fd
            self._lo = min(self._lo, k)
            self._opened()
        for name in new:
            fd = os.open(name, DIR_FLAGS, dir_fd=fd)
            self._names.append(name)
            self._fds.append(fd)
            self._cur = self._cur + b"/" + name if self._cur else name
            self._ends.append(len(self._cur))
            self._opened()
        return fd

    def _opened(self) -> None:
        self._open += 1
        if self._open > self.keep:
            while self._fds[self._lo] < 0:
                self._lo += 1
            os.close(self._fds[self._lo])
            self._fds[self._lo] = -1
            self._open -= 1

    def _truncate(self, n: int) -> None:
        for fd in self._fds[n:]:
            if fd >= 0:
                os.close(fd)
                self._open -= 1
        del self._names[n:], self._fds[n:], self._ends[n:]
        self._cur = self._cur[: self._ends[-1]] if self._ends else b""
        self._lo = min(self._lo, n)

    def close(self) -> None:
        self._truncate(0)


def walk(
    root_fd: int, top: bytes = b"", keep: int = WALK_KEEP_FDS
) -> Iterator[tuple[bytes, os.stat_result, int, bytes]]:
    """Everything under directory ``top`` (itself excluded) beneath ``root_fd``, without
    following any symlink: ``(rel, lstat, parent fd, name)``, a directory before what it
    holds. The parent fd is valid only until the walk goes on. Entries whose path would be
    longer than ``MAX_PATH`` (no record can name them) are left out, so depth stays
    bounded and nothing recurses. What vanishes or changes type meanwhile is skipped."""
    dirs = DirPath(root_fd, keep)
    try:
        todo = [top]
        while todo:
            d = todo.pop()
            try:
                dfd = dirs.fd(d)
                names = sorted(os.fsencode(n) for n in os.listdir(dfd))
            except OSError:
                continue  # gone, or no longer a directory
            for n in names:
                rel = d + b"/" + n if d else n
                if len(rel) > MAX_PATH:
                    continue
                try:
                    st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    continue
                yield rel, st, dfd, n
                if stat.S_ISDIR(st.st_mode):
                    todo.append(rel)
    finally:
        dirs.close()
