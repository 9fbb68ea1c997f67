"""Applier: every op, idempotent replay, no escape from the root, durable barriers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ha_runtime.replication import delta as D
from ha_runtime.replication.journal import (
    DELTA_CONT,
    DELTA_IN_PLACE,
    DELTA_MORE,
    SET_MODE,
    SET_MTIME,
    SET_SIZE,
    Op,
    Record,
)
from ha_runtime.replication.secondary import applier as A
from ha_runtime.replication.secondary.applier import Applier, UnsafePath


def script() -> list[Record]:
    R = Record
    return [
        R(1, Op.MKDIR, b"d", mode=0o40750),
        R(2, Op.CREATE, b"d/f", mode=0o100640, uid=1000, gid=1000),
        R(3, Op.WRITE, b"d/f", offset=0, data=b"hello world"),
        R(4, Op.WRITE, b"d/f", offset=6, data=b"there"),
        R(5, Op.TRUNCATE, b"d/f", offset=8),
        R(6, Op.SYMLINK, b"d/l", path2=b"f"),
        R(7, Op.LINK, b"d/f", path2=b"hard"),
        R(8, Op.SETATTR, b"d/f", flags=SET_MODE | SET_MTIME, mode=0o600, mtime_ns=10**18),
        R(9, Op.SETXATTR, b"d/f", name=b"user.k", data=b"v"),
        R(10, Op.CREATE, b"gone", mode=0o100600),
        R(11, Op.UNLINK, b"gone"),
        R(12, Op.MKDIR, b"e", mode=0o40700),
        R(13, Op.RENAME, b"e", path2=b"e2"),
        R(14, Op.MKNOD, b"fifo", mode=0o10600),
        R(15, Op.FALLOCATE, b"d/f", offset=0, length=100),
        R(16, Op.MKDIR, b"rm", mode=0o40700),
        R(17, Op.RMDIR, b"rm"),
        R(18, Op.FSYNC, b"d/f"),
    ]


def tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath, n)
            st = p.lstat()
            body = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            if p.is_symlink():
                body = os.readlink(p).encode()
            out[str(p.relative_to(root))] = (st.st_mode, int(st.st_mtime), body)
    return out


def test_every_op_and_idempotent_replay(tmp_path: Path) -> None:
    a = Applier(tmp_path / "r")
    for r in script():
        a.apply(r)
    first = tree(tmp_path / "r")
    assert (tmp_path / "r/d/f").read_bytes()[:8] == b"hello th"
    assert (tmp_path / "r/d/f").stat().st_size == 100
    assert (tmp_path / "r/d/f").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "r/d/f").stat().st_uid == 1000
    assert os.getxattr(tmp_path / "r/d/f", b"user.k") == b"v"
    assert os.readlink(tmp_path / "r/d/l") == "f"
    assert (tmp_path / "r/hard").stat().st_ino == (tmp_path / "r/d/f").stat().st_ino
    assert not (tmp_path / "r/gone").exists() and (tmp_path / "r/e2").is_dir()
    assert a.durable_seq == 18
    for r in script():  # replay everything: same tree
        a.apply(r)
    assert tree(tmp_path / "r") == first
    a.close()


def test_no_escape_through_dotdot_or_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"keep")
    a = Applier(tmp_path / "r")
    os.symlink(outside, tmp_path / "r/evil")  # a planted (or replicated) symlink
    for r in (
        Record(1, Op.WRITE, b"../outside/secret", data=b"x"),
        Record(2, Op.WRITE, b"evil/secret", data=b"x"),
        Record(3, Op.UNLINK, b"evil/secret"),
        Record(4, Op.RENAME, b"evil/secret", path2=b"stolen"),
        Record(5, Op.CREATE, b"evil/new", mode=0o100600),
        Record(6, Op.SETATTR, b"evil/secret", flags=SET_SIZE, offset=0),
    ):
        with pytest.raises((UnsafePath, OSError)):
            a.apply(r)
    # writing "through" the symlink itself is refused too (O_NOFOLLOW)
    with pytest.raises(OSError):
        a.apply(Record(7, Op.WRITE, b"evil", data=b"x"))
    assert (outside / "secret").read_bytes() == b"keep"
    assert os.listdir(outside) == ["secret"]
    a.close()


def test_delta_and_replace_are_atomic_and_keep_metadata(tmp_path: Path) -> None:
    a = Applier(tmp_path / "r")
    basis = os.urandom(50_000)
    new = basis[:20_000] + b"changed" + basis[20_000:]
    a.apply(Record(1, Op.CREATE, b"f", mode=0o100640))
    a.apply(Record(2, Op.WRITE, b"f", data=basis))
    d = D.delta(D.signature(basis, 2048), new)
    a.apply(Record(3, Op.DELTA, b"f", data=d.encode()))
    assert (tmp_path / "r/f").read_bytes() == new
    assert (tmp_path / "r/f").stat().st_mode & 0o777 == 0o640
    a.apply(Record(4, Op.REPLACE, b"g", data=b"small"))
    assert (tmp_path / "r/g").read_bytes() == b"small"
    assert not [n for n in os.listdir(tmp_path / "r") if n.startswith(".hapair-tmp")]
    a.close()


def test_delta_in_pieces_rebuilds_the_file_and_refuses_a_stray_piece(tmp_path: Path) -> None:
    a = Applier(tmp_path / "r")
    basis = os.urandom(300_000)
    new = basis[:1000] + os.urandom(40_000) + basis[100_000:]
    a.apply(Record(1, Op.CREATE, b"f", mode=0o100600))
    a.apply(Record(2, Op.WRITE, b"f", data=basis))
    pieces = list(D.split(D.delta(D.signature(basis, 2048), new), 8192))
    assert len(pieces) > 3
    out = 0
    for i, p in enumerate(pieces):
        flags = (DELTA_CONT if i else 0) | (DELTA_MORE if i < len(pieces) - 1 else 0)
        a.apply(Record(3 + i, Op.DELTA, b"f", offset=out, flags=flags, data=p.encode()))
        out += p.length
        # the old file stays in place until the last piece
        assert (tmp_path / "r/f").read_bytes() == (new if i == len(pieces) - 1 else basis)
    assert not [n for n in os.listdir(tmp_path / "r") if n.startswith(".hapair-tmp")]
    with pytest.raises(D.DeltaError):
        a.apply(Record(99, Op.DELTA, b"f", offset=5, flags=DELTA_CONT, data=pieces[1].encode()))
    assert (tmp_path / "r/f").read_bytes() == new
    a.close()


def _in_place_pieces(basis: bytes, new: bytes) -> list[tuple[int, int, bytes]]:
    """(output offset, flags, encoded piece) of an in-place delta, as the primary sends them."""
    d = D.delta(D.signature(basis, 2048), new)
    assert D.in_place(d)
    pieces = list(D.split(d, 8192))
    out, records = 0, []
    for i, p in enumerate(pieces):
        flags = DELTA_IN_PLACE | (DELTA_CONT if i else 0)
        flags |= DELTA_MORE if i < len(pieces) - 1 else 0
        records.append((out, flags, p.encode()))
        out += p.length
    return records


def test_in_place_delta_writes_over_the_file_and_refuses_a_stray_piece(tmp_path: Path) -> None:
    a = Applier(tmp_path / "r")
    basis = os.urandom(300_000)
    new = bytearray(basis[:250_000])  # changed in place, and shorter
    for off in (1000, 90_000, 200_000):
        new[off : off + 3000] = os.urandom(3000)
    a.apply(Record(1, Op.CREATE, b"f", mode=0o100600))
    a.apply(Record(2, Op.WRITE, b"f", data=basis))
    ino = (tmp_path / "r/f").stat().st_ino
    pieces = _in_place_pieces(basis, bytes(new))
    assert len(pieces) > 2
    for i, (off, flags, data) in enumerate(pieces):
        a.apply(Record(3 + i, Op.DELTA, b"f", offset=off, flags=flags, data=data))
    assert (tmp_path / "r/f").read_bytes() == bytes(new)
    assert (tmp_path / "r/f").stat().st_ino == ino  # the same file: nothing built beside
    assert not [n for n in os.listdir(tmp_path / "r") if n.startswith(".hapair-tmp")]
    # a piece whose delta is not open here (or at another offset) is refused, file untouched
    off, flags, data = pieces[1]
    with pytest.raises(D.DeltaError):
        a.apply(Record(99, Op.DELTA, b"f", offset=off, flags=flags, data=data))
    assert (tmp_path / "r/f").read_bytes() == bytes(new)
    # a name removed between pieces ends the delta: the next piece does not write elsewhere
    a.apply(Record(100, Op.DELTA, b"f", offset=0, flags=pieces[0][1], data=pieces[0][2]))
    a.apply(Record(101, Op.UNLINK, b"f"))
    a.apply(Record(102, Op.CREATE, b"f", mode=0o100600))
    with pytest.raises(D.DeltaError):
        a.apply(Record(103, Op.DELTA, b"f", offset=pieces[1][0], flags=pieces[1][1],
                       data=pieces[1][2]))  # fmt: skip
    assert (tmp_path / "r/f").read_bytes() == b""
    a.close()


def test_in_place_delta_of_a_file_with_other_names_builds_a_new_file(tmp_path: Path) -> None:
    """Hard links here are separate files on the primary: patching the shared inode would
    change the other name too; the delta builds a new file and breaks the link."""
    a = Applier(tmp_path / "r")
    basis = os.urandom(100_000)
    new = bytearray(basis)
    new[50_000:50_100] = os.urandom(100)
    a.apply(Record(1, Op.CREATE, b"f", mode=0o100600))
    a.apply(Record(2, Op.WRITE, b"f", data=basis))
    a.apply(Record(3, Op.LINK, b"f", path2=b"g"))
    for i, (off, flags, data) in enumerate(_in_place_pieces(basis, bytes(new))):
        a.apply(Record(4 + i, Op.DELTA, b"f", offset=off, flags=flags, data=data))
    assert (tmp_path / "r/f").read_bytes() == bytes(new)
    assert (tmp_path / "r/g").read_bytes() == basis
    a.close()


def test_barrier_of_many_files_syncs_the_file_system_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: dict[str, int] = {"syncfs": 0, "fsync": 0}
    real_fsync = os.fsync

    class Libc:
        def syncfs(self, fd: int) -> int:
            calls["syncfs"] += 1
            return 0

    def fsync(fd: int) -> None:
        calls["fsync"] += 1
        real_fsync(fd)

    monkeypatch.setattr(A, "libc", Libc())
    monkeypatch.setattr(A.os, "fsync", fsync)
    a = Applier(tmp_path / "b", max_open=4)  # most files retired to the pending list
    seq = 0
    for i in range(A.SYNCFS_OVER + 5):
        seq += 1
        a.apply(Record(seq, Op.CREATE, b"f%d" % i, mode=0o100600))
        seq += 1
        a.apply(Record(seq, Op.WRITE, b"f%d" % i, data=b"x" * 10))
    seq += 1
    a.apply(Record(seq, Op.FSYNC, b""))
    assert calls == {"syncfs": 1, "fsync": 0}
    assert a.durable_seq == seq
    # the retired files were closed, and a later barrier of one file fsyncs just that file
    assert not a._pending and not a._dirty_files and not a._dirty_dirs
    a.apply(Record(seq + 1, Op.WRITE, b"f0", data=b"y"))
    a.apply(Record(seq + 2, Op.FSYNC, b"f0"))
    assert calls["syncfs"] == 1 and calls["fsync"] >= 1
    assert a.durable_seq == seq + 2
    a.close()


def test_resync_removal_under_a_parent_already_gone_is_a_no_op(tmp_path: Path) -> None:
    """A resync removes a tree, then a path that was under it (both recorded): done already.
    A live UNLINK there is still an error (the copies disagree)."""
    root = tmp_path / "r"
    a = Applier(root)
    (root / "d").mkdir()
    (root / "d/f").write_bytes(b"x")
    (root / "plain").write_bytes(b"x")
    a.apply(Record(1, Op.UNLINK, b"d", flags=1))
    a.apply(Record(2, Op.UNLINK, b"d/f", flags=1))
    a.apply(Record(3, Op.UNLINK, b"plain/f", flags=1))  # parent is not a directory
    assert not (root / "d").exists()
    with pytest.raises(FileNotFoundError):
        a.apply(Record(4, Op.UNLINK, b"d/f"))
    a.close()
