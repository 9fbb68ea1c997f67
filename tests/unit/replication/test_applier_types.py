"""Applier: a record whose name holds something of another type replaces it (an incremental
resync used to be refused there for ever), deep trees, and field values it must refuse
cleanly (a ValueError or OSError, never an exception that ends the secondary's service)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ha_runtime.replication.journal import SET_UID, Op, Record
from ha_runtime.replication.secondary.applier import Applier, RecordRefused


def _kind(p: Path) -> str:
    m = p.lstat().st_mode
    if stat.S_ISDIR(m):
        return "dir"
    if stat.S_ISLNK(m):
        return "link"
    if stat.S_ISREG(m):
        return "file"
    if stat.S_ISFIFO(m):
        return "fifo"
    return "other"


def _prepare(root: Path, what: str) -> None:
    """Put ``what`` at root/x: a file, a symlink, a fifo, or a directory with a subtree
    holding a symlink that points outside (removing it must not follow it)."""
    x = root / "x"
    if what == "file":
        x.write_bytes(b"old")
    elif what == "link":
        x.symlink_to("/etc")
    elif what == "fifo":
        os.mkfifo(x)
    else:
        (x / "a/b").mkdir(parents=True)
        (x / "a/b/f").write_bytes(b"deep")
        (x / "a/out").symlink_to(root.parent / "outside")


RECORDS = {
    "file": Record(1, Op.CREATE, b"x", mode=0o100640),
    "dir": Record(1, Op.MKDIR, b"x", mode=0o40750),
    "link": Record(1, Op.SYMLINK, b"x", path2=b"target"),
    "fifo": Record(1, Op.MKNOD, b"x", mode=0o10600),
}


@pytest.mark.parametrize("new", sorted(RECORDS))
@pytest.mark.parametrize("old", ["file", "dir", "link", "fifo"])
def test_a_namespace_record_replaces_another_type(tmp_path: Path, old: str, new: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    root = tmp_path / "root"
    a = Applier(root)
    try:
        _prepare(root, old)
        a.apply(RECORDS[new])
        a.apply(Record(2, Op.FSYNC, b""))
    finally:
        a.close()
    assert _kind(root / "x") == new
    if new == "link":
        assert os.readlink(root / "x") == "target"
    if new == "file" and old == "file":
        assert (root / "x").read_bytes() == b"old"  # same type: kept (replay is a no-op)
    assert (outside / "keep").read_bytes() == b"keep"
    assert sorted(os.listdir(outside)) == ["keep"]


@pytest.mark.parametrize("old", ["file", "dir", "link", "fifo"])
def test_rename_and_link_onto_another_type_replace_it(tmp_path: Path, old: str) -> None:
    root = tmp_path / "root"
    (tmp_path / "outside").mkdir()
    a = Applier(root)
    try:
        _prepare(root, old)
        a.apply(Record(1, Op.MKDIR, b"d", mode=0o40700))
        a.apply(Record(2, Op.CREATE, b"d/f", mode=0o100600))
        a.apply(Record(3, Op.WRITE, b"d/f", data=b"new"))
        a.apply(Record(4, Op.LINK, b"d/f", path2=b"x"))
        assert _kind(root / "x") == "file"  # (reading a fifo would block)
        assert (root / "x").read_bytes() == b"new"
        assert (root / "x").stat().st_ino == (root / "d/f").stat().st_ino
        _clear(root / "x")
        _prepare(root, old)
        a.apply(Record(5, Op.RENAME, b"d", path2=b"x"))
    finally:
        a.close()
    assert (root / "x/f").read_bytes() == b"new"
    assert not (root / "d").exists()


def _clear(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        for sub in sorted(p.rglob("*"), key=lambda q: -len(q.parts)):
            if sub.is_dir() and not sub.is_symlink():
                sub.rmdir()
            else:
                sub.unlink()
        p.rmdir()
    else:
        p.unlink()


def test_data_and_whole_file_records_replace_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (tmp_path / "outside").mkdir()
    a = Applier(root)
    try:
        _prepare(root, "dir")
        a.apply(Record(1, Op.REPLACE, b"x", data=b"whole"))
        assert (root / "x").read_bytes() == b"whole"
    finally:
        a.close()


def test_a_rename_onto_its_own_ancestor_is_refused_without_removing_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    a = Applier(root)
    try:
        a.apply(Record(1, Op.MKDIR, b"a", mode=0o40700))
        a.apply(Record(2, Op.MKDIR, b"a/b", mode=0o40700))
        a.apply(Record(3, Op.CREATE, b"a/b/f", mode=0o100600))
        with pytest.raises(OSError):
            a.apply(Record(4, Op.RENAME, b"a/b", path2=b"a"))
    finally:
        a.close()
    assert (root / "a/b/f").exists()


def test_a_tree_deeper_than_the_interpreter_stack_is_removed(tmp_path: Path) -> None:
    """Renames can nest a tree deeper than any one path (MAX_PATH): removing it recursed
    once per level and ended the secondary with RecursionError."""
    root = tmp_path / "root"
    a = Applier(root)
    depth = 1500
    try:
        # 1500 levels built through records: a chain of 500 under "c", renamed under one
        # of 1000 (each path stays under MAX_PATH).
        a.apply(Record(1, Op.MKDIR, b"t", mode=0o40700))
        p = b"t"
        for _ in range(depth - 500 - 1):
            p += b"/d"
            a.apply(Record(0, Op.MKDIR, p, mode=0o40700))
        q = b"c"
        a.apply(Record(0, Op.MKDIR, q, mode=0o40700))
        for _ in range(499):
            q += b"/d"
            a.apply(Record(0, Op.MKDIR, q, mode=0o40700))
        a.apply(Record(0, Op.CREATE, q + b"/leaf", mode=0o100600))
        a.apply(Record(0, Op.RENAME, b"c", path2=p + b"/c"))
        a.apply(Record(0, Op.CREATE, b"t", mode=0o100600))  # a file replaces the tree
        a.apply(Record(0, Op.FSYNC, b""))
    finally:
        a.close()
    assert (root / "t").is_file()


@pytest.mark.parametrize("uid", [-2, -(1 << 40), 1 << 32, 1 << 64])
def test_an_id_out_of_range_is_refused_as_a_bad_record(tmp_path: Path, uid: int) -> None:
    """uid -2 made os.chown raise OverflowError, which ended the secondary's service."""
    a = Applier(tmp_path / "root")
    try:
        for rec in (
            Record(1, Op.CREATE, b"f", mode=0o100600, uid=uid),
            Record(2, Op.MKDIR, b"d", mode=0o40700, gid=uid),
            Record(3, Op.SETATTR, b"", flags=SET_UID, uid=uid),
            Record(4, Op.SYMLINK, b"l", path2=b"t", uid=uid),
        ):
            with pytest.raises(RecordRefused, match=r"uid|gid"):
                a.apply(rec)
    finally:
        a.close()


def test_other_fields_out_of_range_are_refused_not_overflowed(tmp_path: Path) -> None:
    a = Applier(tmp_path / "root")
    try:
        a.apply(Record(1, Op.CREATE, b"f", mode=0o100600))
        for rec in (
            Record(2, Op.SETXATTR, b"f", name=b"user.k", data=b"v", flags=1 << 31),
            Record(3, Op.MKNOD, b"n", mode=1 << 40),
        ):
            with pytest.raises((RecordRefused, OSError)):
                a.apply(rec)
    finally:
        a.close()
