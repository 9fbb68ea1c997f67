"""The real Applier under hypothesis (root: owner ids are applied).

- Hostile sequences (types changing under a name, deep nesting, non-UTF-8 names, ids of
  all 32 bits and out of range, symlinks out of the copy, a planted one included): nothing
  outside the root changes and nothing but the applier's refusals (OSError,
  RecordRefused) escapes.
- Model check: operations done directly on a local directory (as the primary's kernel
  does them; skipped where it refuses them) and the same operations as records applied to
  the applier leave the same tree (types, contents, symlink targets, permissions, owners,
  hard links). Records with ids out of range are refused and change nothing.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ha_runtime.replication.journal import (
    SET_GID,
    SET_MODE,
    SET_UID,
    Op,
    Record,
    RecordError,
    decode_record,
)
from ha_runtime.replication.secondary.applier import Applier, RecordRefused

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root: owner ids")

# A small name space, so that operations meet what earlier ones made: non-UTF-8 names, a
# space, names under a directory, and under the planted symlink.
NAMES = [b"a", b"\xff\xfeb", b"\xe9t\xe9 c", b"a/a", b"a/\xff\xfeb", b"evil", b"evil/x"]
GOOD_IDS = [0, 1, 1000, (1 << 31) - 1, 1 << 31, 3_000_000_000, 0xFFFFFFFE, 0xFFFFFFFF, -1]
BAD_IDS = [-2, -(1 << 31), 1 << 32, 1 << 40]
TARGETS = [b"a", b"../a", b"/etc", b"../../outside", b"../../../outside/keep", b"\xff"]

paths = st.sampled_from(NAMES)
# Weighted: data and namespace operations often, deep chains now and then.
KINDS = (
    ["create"] * 4
    + ["mkdir"] * 3
    + ["write"] * 4
    + ["unlink"] * 2
    + ["rename"] * 3
    + ["truncate", "rmdir", "link", "chmod", "chown", "fsync", "fifo", "symlink", "deep"]
)
ids = st.sampled_from(GOOD_IDS)


@st.composite
def records(draw: st.DrawFn, bad_ids: bool, hostile: bool = False) -> list[Record]:
    """One operation as the records the primary would send for it; ``hostile`` adds a full
    resync's whole-file and delta records (garbage deltas included)."""
    p = draw(paths)
    kind = draw(st.sampled_from(KINDS + (["replace", "delta"] if hostile else [])))
    if kind == "replace":
        return [Record(0, Op.REPLACE, p, data=draw(st.binary(max_size=64)))]
    if kind == "delta":
        flags = draw(st.integers(0, 7))
        return [Record(0, Op.DELTA, p, flags=flags, data=draw(st.binary(max_size=64)))]
    uid = draw(st.sampled_from(GOOD_IDS + (BAD_IDS if bad_ids else [])))
    gid = draw(ids)
    if kind == "create":
        return [Record(0, Op.CREATE, p, mode=0o100000 | draw(st.integers(0, 0o777)), uid=uid)]
    if kind == "mkdir":
        return [Record(0, Op.MKDIR, p, mode=0o40000 | draw(st.integers(0o700, 0o777)), gid=gid)]
    if kind == "fifo":
        return [Record(0, Op.MKNOD, p, mode=0o10640, uid=uid, gid=gid)]
    if kind == "symlink":
        return [Record(0, Op.SYMLINK, p, path2=draw(st.sampled_from(TARGETS)), uid=uid)]
    # open(O_CREAT) then the data operation (the CREATE is skipped where the file exists)
    opened = Record(0, Op.CREATE, p, mode=0o100644)
    if kind == "write":
        data = draw(st.binary(min_size=1, max_size=64))
        return [opened, Record(0, Op.WRITE, p, offset=draw(st.integers(0, 100)), data=data)]
    if kind == "truncate":
        return [opened, Record(0, Op.TRUNCATE, p, offset=draw(st.integers(0, 200)))]
    if kind == "unlink":
        return [Record(0, Op.UNLINK, p)]
    if kind == "rmdir":
        return [Record(0, Op.RMDIR, p)]
    if kind in ("rename", "link"):
        op = Op.RENAME if kind == "rename" else Op.LINK
        return [Record(0, op, p, path2=draw(paths))]
    if kind == "chmod":
        return [Record(0, Op.SETATTR, p, flags=SET_MODE, mode=draw(st.integers(0o700, 0o7777)))]
    if kind == "chown":
        return [Record(0, Op.SETATTR, p, flags=SET_UID | SET_GID, uid=uid, gid=gid)]
    if kind == "fsync":
        return [Record(0, Op.FSYNC, b"")]
    depth = draw(st.integers(5, 120))  # a deep chain under p (well under MAX_PATH)
    return [Record(0, Op.MKDIR, b"/".join([p] + [b"d"] * i), mode=0o40700) for i in range(depth)]


def _snapshot(d: Path) -> dict[bytes, tuple[int, int, int, int, bytes]]:
    """path -> (mode, uid, gid, size, content or target), with no symlink followed."""
    out = {}
    base = os.fsencode(d)
    for dirpath, dirs, files in os.walk(base):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            body = b""
            if stat.S_ISLNK(s.st_mode):
                body = os.readlink(p)
            elif stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    body = f.read()
            size = 0 if stat.S_ISDIR(s.st_mode) else s.st_size  # a directory's depends on its past
            out[os.path.relpath(p, base)] = (s.st_mode, s.st_uid, s.st_gid, size, body)
    return out


def _links(d: Path) -> set[frozenset[bytes]]:
    """The hard-link structure: sets of names of one file."""
    by_ino: dict[int, set[bytes]] = {}
    base = os.fsencode(d)
    for dirpath, _, files in os.walk(base):
        for n in files:
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            if stat.S_ISREG(s.st_mode):
                by_ino.setdefault(s.st_ino, set()).add(os.path.relpath(p, base))
    return {frozenset(v) for v in by_ino.values()}


class _World:
    """A root for the applier, a sentinel directory outside it, and a symlink planted in
    the root pointing at the sentinel."""

    def __init__(self, top: Path) -> None:
        self.outside = top / "outside"
        self.outside.mkdir()
        (self.outside / "keep").write_bytes(b"keep")
        self.root = top / "root"
        self.root.mkdir()
        os.symlink(self.outside, self.root / "evil")
        self.before = _snapshot(self.outside)
        self.outside_st = self.outside.lstat()

    def untouched(self) -> None:
        assert _snapshot(self.outside) == self.before
        s = self.outside.lstat()
        assert (s.st_mode, s.st_uid, s.st_gid) == (
            self.outside_st.st_mode, self.outside_st.st_uid, self.outside_st.st_gid,
        )  # fmt: skip


HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HOSTILE
@given(st.lists(records(bad_ids=True, hostile=True), min_size=1, max_size=40))
def test_hostile_sequences_stay_inside_the_root_and_raise_only_refusals(
    ops: list[list[Record]],
) -> None:
    with tempfile.TemporaryDirectory() as top:
        w = _World(Path(top))
        a = Applier(w.root)
        try:
            for seq, group in enumerate(ops, 1):
                for r in group:
                    with contextlib.suppress(OSError, RecordRefused):
                        a.apply(_seq(r, seq))
            a.barrier()
        finally:
            a.close()
        w.untouched()


def _seq(r: Record, seq: int) -> Record:
    return Record(
        seq, r.op, r.path, r.path2, r.offset, r.length, r.mode, r.uid, r.gid, r.rdev,
        r.atime_ns, r.mtime_ns, r.flags, r.name, r.data,
    )  # fmt: skip


# --------------------------------------------------------------------------- the model


def _chown_id(v: int) -> int:
    return -1 if v == 0xFFFFFFFF else v


class _Model:
    """The operations done directly, through directory descriptors opened without
    following symlinks (the primary's kernel never sends an operation through a symlink
    of the mount that leads out of it)."""

    def __init__(self, root: Path) -> None:
        self.root = os.open(root, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        os.close(self.root)

    def _at(self, path: bytes, fn: Callable[[int, bytes], None]) -> None:
        parts = path.split(b"/")
        fd = os.dup(self.root)
        try:
            for c in parts[:-1]:
                nfd = os.open(c, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nfd
            fn(fd, parts[-1])
        finally:
            os.close(fd)

    def _regular(self, pfd: int, name: bytes) -> int:
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=pfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(22, "not a file")
        return fd

    def do(self, r: Record) -> None:  # noqa: PLR0915
        """Perform ``r`` as the application's operation; OSError if the kernel refuses."""
        uid, gid = _chown_id(r.uid), _chown_id(r.gid)

        def create(pfd: int, name: bytes) -> None:
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600, dir_fd=pfd)
            os.fchmod(fd, r.mode & 0o7777)
            os.fchown(fd, uid, gid)
            os.close(fd)

        def mkdir(pfd: int, name: bytes) -> None:
            os.mkdir(name, 0o700, dir_fd=pfd)
            os.chmod(name, r.mode & 0o7777, dir_fd=pfd)
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)

        def data(pfd: int, name: bytes) -> None:
            fd = self._regular(pfd, name)
            try:
                if r.op == Op.WRITE:
                    os.pwrite(fd, r.data, r.offset)
                else:
                    os.ftruncate(fd, r.offset)
            finally:
                os.close(fd)

        def two(fn: Callable[..., None]) -> None:
            def src(sfd: int, sname: bytes) -> None:
                self._at(r.path2, lambda dfd, dname: fn(sfd, sname, dfd, dname))

            self._at(r.path, src)

        if r.op == Op.CREATE:
            self._at(r.path, create)
        elif r.op == Op.MKDIR:
            self._at(r.path, mkdir)
        elif r.op == Op.MKNOD:

            def fifo(pfd: int, name: bytes) -> None:
                os.mknod(name, r.mode, dir_fd=pfd)
                os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)

            self._at(r.path, fifo)
        elif r.op == Op.SYMLINK:

            def link(pfd: int, name: bytes) -> None:
                os.symlink(r.path2, name, dir_fd=pfd)
                os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)

            self._at(r.path, link)
        elif r.op in (Op.WRITE, Op.TRUNCATE):
            self._at(r.path, data)
        elif r.op == Op.UNLINK:
            self._at(r.path, lambda pfd, n: os.unlink(n, dir_fd=pfd))
        elif r.op == Op.RMDIR:
            self._at(r.path, lambda pfd, n: os.rmdir(n, dir_fd=pfd))
        elif r.op == Op.RENAME:
            two(lambda s, sn, d, dn: os.rename(sn, dn, src_dir_fd=s, dst_dir_fd=d))
        elif r.op == Op.LINK:
            two(lambda s, sn, d, dn: os.link(sn, dn, src_dir_fd=s, dst_dir_fd=d,
                                             follow_symlinks=False))  # fmt: skip
        elif r.op == Op.SETATTR:

            def setattr_(pfd: int, name: bytes) -> None:
                if r.flags & SET_MODE:
                    s = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                    if not stat.S_ISLNK(s.st_mode):
                        os.chmod(name, r.mode & 0o7777, dir_fd=pfd)
                if r.flags & SET_UID:
                    os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)

            self._at(r.path, setattr_)


def _valid_ids(r: Record) -> bool:
    return all(v == -1 or 0 <= v <= 0xFFFFFFFF for v in (r.uid, r.gid))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(bad_ids=True), min_size=1, max_size=40))
def test_valid_operations_leave_the_same_tree_as_done_directly(
    ops: list[list[Record]],
) -> None:
    with tempfile.TemporaryDirectory() as top:
        model_dir, root = Path(top, "model"), Path(top, "root")
        model_dir.mkdir()
        model, a = _Model(model_dir), Applier(root)
        seq = 0
        try:
            for group in ops:
                for r in group:
                    seq += 1
                    rec = _seq(r, seq)
                    if not _valid_ids(rec):
                        with pytest.raises(RecordRefused):
                            a.apply(rec)
                        with pytest.raises(RecordError):
                            rec.encode()  # never sent as another id
                        continue
                    try:
                        model.do(rec)
                    except OSError:
                        continue  # the application's call failed: nothing to replicate
                    # through the wire's encoding; a valid operation applies, whatever came before
                    a.apply(decode_record(rec.encode()))
            a.barrier()
        finally:
            model.close()
            a.close()
        assert _snapshot(root) == _snapshot(model_dir)
        assert _links(root) == _links(model_dir)
