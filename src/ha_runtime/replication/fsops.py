"""File system operations whose meaning both copies share: the primary's file system
(``primary.fs``) performs them on the backing directory, the secondary's applier
(``secondary.applier``) replays them from the journal. Written once here, so a SETATTR
means the same on both sides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
from typing import Any

from ha_runtime.replication.journal import (
    SET_ATIME,
    SET_GID,
    SET_MODE,
    SET_MTIME,
    SET_UID,
    Record,
)

# The C library, for the calls os lacks (renameat2, fallocate modes, syncfs, sync_file_range).
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
AT_FDCWD = -100


def renameat2(sfd: int, src: bytes, dfd: int, dst: bytes, flags: int) -> None:
    if libc.renameat2(sfd, src, dfd, dst, ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    r = libc.fallocate(fd, ctypes.c_int(mode), ctypes.c_long(offset), ctypes.c_long(length))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def set_attributes(
    r: Record,
    st: os.stat_result,
    target: bytes | int,
    dir_fd: int | None = None,
    ids: tuple[int, int] | None = None,
) -> None:
    """Perform SETATTR ``r``: owner, mode, times, as its SET_* flags say (its size is a
    TRUNCATE, the caller's). ``target`` is a path (relative to ``dir_fd`` if given, a last
    symlink never followed) or an open descriptor; ``st`` its attributes before (a time not
    set stays; a symlink's mode is left alone). ``ids``: (uid, gid) already checked, -1 for
    unchanged (default: the record's own)."""
    uid, gid = ids if ids is not None else (r.uid, r.gid)
    on_fd = isinstance(target, int)
    at: dict[str, Any] = {} if on_fd else {"dir_fd": dir_fd, "follow_symlinks": False}
    if r.flags & (SET_UID | SET_GID):
        os.chown(target, uid if r.flags & SET_UID else -1, gid if r.flags & SET_GID else -1, **at)
    if r.flags & SET_MODE and not stat.S_ISLNK(st.st_mode):
        # chmod never follows a last symlink here (checked above); Linux has no lchmod.
        if on_fd:
            os.chmod(target, stat.S_IMODE(r.mode))
        else:
            os.chmod(target, stat.S_IMODE(r.mode), dir_fd=dir_fd)
    if r.flags & (SET_ATIME | SET_MTIME):
        a = r.atime_ns if r.flags & SET_ATIME else st.st_atime_ns
        m = r.mtime_ns if r.flags & SET_MTIME else st.st_mtime_ns
        os.utime(target, ns=(a, m), **at)
