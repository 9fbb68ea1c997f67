"""The FUSE layer's answer to the kernel's security.capability query before every write."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyfuse3
import pytest
import trio

from ha_runtime.replication.journal import Record
from ha_runtime.replication.primary import fs as fusefs

CAPS = b"security.capability"
# A version 2 capability set (cap_net_bind_service=ep), as setcap writes it.
CAP_VALUE = bytes.fromhex("0100000200040000000000000000000000000000")


class _Sink:
    def __init__(self) -> None:
        self.records: list[Record] = []

    async def before(self, rec: Record) -> None:
        return None

    def after(self, rec: Record) -> None:
        self.records.append(rec)

    async def barrier(self, path: bytes, datasync: bool) -> None:
        return None


def _getxattr(fs: fusefs.PassthroughFS, ino: int, name: bytes) -> bytes | int:
    try:
        return trio.run(fs.getxattr, ino, name, None)
    except pyfuse3.FUSEError as e:
        return e.errno


def test_absent_capability_answered_from_memory_until_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f").write_bytes(b"x")
    sink = _Sink()
    fs = fusefs.PassthroughFS(tmp_path, sink)
    ino = fs._attr(b"f").st_ino
    calls: list[bytes] = []
    real = os.getxattr

    def counting(path: bytes, name: bytes, *, follow_symlinks: bool = True) -> bytes:
        calls.append(name)
        return real(path, name, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(fusefs.os, "getxattr", counting)
    assert _getxattr(fs, ino, CAPS) == errno.ENODATA
    assert _getxattr(fs, ino, CAPS) == errno.ENODATA
    assert calls == [CAPS]  # the second answer needed no system call
    assert _getxattr(fs, ino, b"user.other") == errno.ENODATA
    assert _getxattr(fs, ino, b"user.other") == errno.ENODATA
    assert calls == [CAPS, b"user.other", b"user.other"]  # only the capability is remembered
    trio.run(fs.setxattr, ino, CAPS, CAP_VALUE, None)  # root (this tier): must work
    assert [r.name for r in sink.records] == [CAPS]
    assert _getxattr(fs, ino, CAPS) == CAP_VALUE
    trio.run(fs.removexattr, ino, CAPS, None)
    assert _getxattr(fs, ino, CAPS) == errno.ENODATA
