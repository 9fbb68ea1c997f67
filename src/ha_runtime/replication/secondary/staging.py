"""Where the secondary builds a file's new content before it replaces the file.

A name in the tree cannot be reserved: the application may create any name, a
``.hapair-tmp.<name>`` included, and a temp file of that name overwrote the application's.
So the new content is an anonymous file (``O_TMPFILE``): a delta cut short leaves nothing
behind. When it is complete it gets a random, exclusively created name in the **staging
directory** beside the backing root (``.<root name>.hapair-staging``, on the same file
system, outside the tree: nothing lists, digests or replicates it), and is renamed over
the file. Leftovers of a crash between those two steps are removed when the applier
starts.

When the backing root is a file system of its own (the staging directory would be on
another one, so no rename could cross), the name is taken in the file's own directory, as
``.hapair-tmp.<32 hex digits>`` created exclusively (never replacing anything), for the
microseconds between link and rename; a crash exactly then leaves it in the tree, where a
full resync removes it like any file the primary lacks. A file system without
``O_TMPFILE`` gets the same exclusive random name at once, in the staging directory
(cleared at start) or, on a root of its own, in the file's directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from ha_runtime.replication.beneath import DIR_FLAGS
from ha_runtime.replication.layout import staging_of

TMP_PREFIX = b".hapair-tmp."


_NAMED = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _tmp_name() -> bytes:
    return TMP_PREFIX + secrets.token_hex(16).encode()


class Staging:
    def __init__(self, root: Path, root_fd: int) -> None:
        self.dir_fd: int | None = None
        self.tmpfile = True  # O_TMPFILE works here (learnt at the first refusal)
        # fd -> (its directory, its name), where O_TMPFILE is missing
        self._named: dict[int, tuple[int, bytes]] = {}
        where = staging_of(root)
        with contextlib.suppress(FileExistsError):
            where.mkdir(mode=0o700)
        fd = os.open(where, DIR_FLAGS)
        if os.fstat(fd).st_dev != os.fstat(root_fd).st_dev:
            os.close(fd)
            return
        self.dir_fd = fd
        for name in os.listdir(fd):  # a crash between link and rename left these
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)

    def discard(self, fd: int) -> None:
        """Close a file from ``create`` that will not be committed (a delta cut short)."""
        named = self._named.pop(fd, None)
        os.close(fd)
        if named is not None:
            with contextlib.suppress(OSError):
                os.unlink(named[1], dir_fd=named[0])
            os.close(named[0])

    def close(self) -> None:
        for fd in list(self._named):
            self.discard(fd)
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None

    def create(self, pfd: int) -> int:
        """An anonymous file for the new content of a file in directory ``pfd``."""
        where = pfd if self.dir_fd is None else self.dir_fd
        if self.tmpfile:
            try:
                return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=where)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self.tmpfile = False  # this file system has no O_TMPFILE: named at once
        while True:
            tmp = _tmp_name()
            try:
                fd = os.open(tmp, _NAMED, 0o600, dir_fd=where)
            except FileExistsError:
                continue
            self._named[fd] = (os.dup(where), tmp)
            return fd

    def commit(self, fd: int, pfd: int, name: bytes) -> None:
        """Make the file ``fd`` (from ``create``) the file ``name`` in ``pfd`` (atomic
        rename)."""
        where = pfd if self.dir_fd is None else self.dir_fd
        tmp: bytes | None = None
        named = self._named.pop(fd, None)
        if named is not None:
            os.close(named[0])
            tmp = named[1]
        while tmp is None:
            tmp = _tmp_name()
            try:
                os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=where, follow_symlinks=True)
            except FileExistsError:
                tmp = None  # never replace anything, however unlikely the name
        try:
            os.rename(tmp, name, src_dir_fd=where, dst_dir_fd=pfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=where)
            if e.errno == errno.EXDEV and self.dir_fd is not None:
                # Same device, another mount (a bind mount of the root): from now on the
                # new content is built in the file's own directory; this record fails and
                # the primary sends it again on the next link.
                self.close()
            raise
