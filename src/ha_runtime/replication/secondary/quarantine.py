"""Copy what a split brain's full resync is about to replace into the quarantine.

Both sides go through directory descriptors and never follow a symlink: the source is the
secondary's copy, written by its peer (a directory there may be a symlink to ``/etc``), and
the destination receives copies of those symlinks (resolved by name, ``l/x`` would be
written through the copy of ``l``). So a source path is resolved beneath the backing root
(``beneath``), a destination directory is created or opened component by component with
``O_NOFOLLOW``, and every file is created with ``O_EXCL``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass, field

from ha_runtime.replication import beneath

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Result:
    copied: int = 0  # entries copied (files, directories, links, nodes)
    skipped: int = 0  # paths not beneath the root without a symlink, or not there
    errors: list[str] = field(default_factory=list)  # what could not be saved, and why


class _DestDirs(beneath.DirPath):
    """``DirPath`` over the quarantine that creates missing directories (mode 0700: the
    quarantine holds the application's data) and refuses anything else on the way."""

    def fd(self, rel: bytes) -> int:
        try:
            return super().fd(rel)
        except FileNotFoundError:
            pass
        parts = rel.split(b"/")
        for k in range(1, len(parts) + 1):
            with contextlib.suppress(FileExistsError):
                os.mkdir(parts[k - 1], 0o700, dir_fd=super().fd(b"/".join(parts[: k - 1])))
        return super().fd(rel)


def copy_paths(root_fd: int, dest_fd: int, paths: list[bytes]) -> Result:
    """Copy each path (a directory with everything under it) from beneath ``root_fd`` to
    the same path beneath ``dest_fd``. A path already copied (listed twice, or under a
    directory copied before) is left as it is."""
    res = Result()
    dest = _DestDirs(dest_fd)
    try:
        for rel in paths:
            try:
                pfd, name = beneath.open_parent(root_fd, rel)
            except (OSError, ValueError):
                res.skipped += 1  # invalid, missing, or behind a symlink: not in the copy
                continue
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                _copy_one(pfd, name, st, dest, rel, res)
            except FileNotFoundError:
                res.skipped += 1
                continue
            except OSError as e:
                res.errors.append(f"{os.fsdecode(rel)}: {e.strerror or e}")
                continue
            finally:
                if pfd != root_fd:
                    os.close(pfd)
            if stat.S_ISDIR(st.st_mode):
                for sub, sst, sfd, sname in beneath.walk(root_fd, rel):
                    try:
                        _copy_one(sfd, sname, sst, dest, sub, res)
                    except FileNotFoundError:
                        continue  # gone meanwhile
                    except OSError as e:
                        res.errors.append(f"{os.fsdecode(sub)}: {e.strerror or e}")
    finally:
        dest.close()
    return res


def _copy_one(  # noqa: PLR0917
    sfd: int, name: bytes, st: os.stat_result, dest: _DestDirs, rel: bytes, res: Result
) -> None:
    """Copy the entry ``name`` of directory ``sfd`` (lstat ``st``) to ``rel`` in dest."""
    head = rel.rpartition(b"/")[0]
    try:
        dfd = dest.fd(head)
    except NotADirectoryError:
        res.skipped += 1  # under a symlink copied before: that link is what was there
        return
    m = st.st_mode
    try:
        if stat.S_ISREG(m):
            _copy_file(sfd, name, dfd, st)
        elif stat.S_ISDIR(m):
            os.mkdir(name, 0o700, dir_fd=dfd)
        elif stat.S_ISLNK(m):
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
        elif stat.S_ISFIFO(m) or stat.S_ISCHR(m) or stat.S_ISBLK(m):
            os.mknod(name, m, st.st_rdev, dir_fd=dfd)
        else:
            res.skipped += 1  # a socket holds no data
            return
    except FileExistsError:
        return  # copied already
    if not stat.S_ISREG(m):
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISLNK(m):
            # Not a link (checked: created just now, in our own directory).
            os.chmod(name, stat.S_IMODE(m), dir_fd=dfd)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
    res.copied += 1


def _copy_file(sfd: int, name: bytes, dfd: int, st: os.stat_result) -> None:
    src = beneath.open_file(name, sfd)
    try:
        out = os.open(name, _CREATE, 0o600, dir_fd=dfd)
        try:
            _copy_data(src, out)
            os.fchown(out, st.st_uid, st.st_gid)
            os.fchmod(out, stat.S_IMODE(st.st_mode))
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        except BaseException:
            # No part of a file in the quarantine: the operator would take it for the file.
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)
            raise
        finally:
            os.close(out)
    finally:
        os.close(src)


def _copy_data(src: int, out: int) -> None:
    try:
        while os.copy_file_range(src, out, 1 << 30):
            pass
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    else:
        return
    os.lseek(src, 0, os.SEEK_SET)
    os.lseek(out, 0, os.SEEK_SET)
    os.ftruncate(out, 0)
    while chunk := os.read(src, 1 << 20):
        mv = memoryview(chunk)
        while mv:
            mv = mv[os.write(out, mv) :]
