"""Open files whose last name is removed (unlinked or renamed over) while the application
keeps using them: temp files, SQLite's among them. Found by stress-ng's file-system
stressors through the replicated directory (tests/lab/test_posix_suite.py): fstat,
ftruncate and reads of such a file failed with ENOENT, and its writes were shipped under
its old name, which may name another file by then.

Needs root and /dev/fuse (both available here and in CI)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
from fusepair import configs, in_step

from ha_runtime.config import ReplicationSettings
from ha_runtime.generation import Generation, GenerationStore, GenRecord
from ha_runtime.replication.service import ReplicationService
from tests.sitefactory import free_tcp_port

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="root+FUSE"),
]


def orphan_life(app: Path) -> dict[str, Any]:
    """What an application does with a file it unlinked, then with a new file of that name
    and with a file renamed over another one that is still open."""
    out: dict[str, Any] = {}
    fd = os.open(app / "tmp", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, b"scratch" * 100, 0)
    os.unlink(app / "tmp")
    os.pwrite(fd, b"more", 700)
    out["size"] = os.fstat(fd).st_size
    os.ftruncate(fd, 10)
    out["truncated"] = os.fstat(fd).st_size
    os.fchmod(fd, 0o640)
    out["mode"] = os.fstat(fd).st_mode & 0o777
    os.fsync(fd)
    out["read"] = os.pread(fd, 100, 0)
    # A new file of the old name: the orphan's writes must never reach it, here or there.
    new = app / "tmp"
    new.write_bytes(b"the new file")
    fd2 = os.open(new, os.O_RDONLY)
    os.pwrite(fd, b"ORPHAN DATA", 0)
    os.ftruncate(fd, 3)
    os.fsync(fd)
    os.close(fd)
    # renamed over while open: the old target lives on through its descriptor
    (app / "a").write_bytes(b"a")
    fd3 = os.open(app / "b", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd3, b"old b", 0)
    os.rename(app / "a", app / "b")
    os.pwrite(fd3, b"OLD B WRITES", 0)
    out["b_orphan"] = os.pread(fd3, 100, 0)
    os.fsync(fd3)
    os.close(fd3)
    os.close(fd2)
    fd4 = os.open(app / "b", os.O_RDWR)
    os.fsync(fd4)
    os.close(fd4)
    return out


def test_orphans_are_served_by_descriptor_and_never_replicated(tmp_path: Path) -> None:
    module, c1, c2 = configs(tmp_path)
    st = ReplicationSettings(
        port=free_tcp_port(), timeout_ms=2000, networks=("lan",), site_key=b"k" * 48
    )
    for c in (c1, c2):
        GenerationStore(c.state_dir, module.name).save(GenRecord(Generation().advance()))
    prim = ReplicationService(module, c1, st)
    sec = ReplicationService(module, c2, st)
    app = tmp_path / "app"
    b1, b2 = tmp_path / "node1/replica/demo/0", tmp_path / "node2/replica/demo/0"

    async def main() -> dict[str, Any]:
        async with trio.open_nursery() as n:
            await n.start(sec.run_secondary)
            await n.start(prim.run_primary)
            with trio.fail_after(15):
                while not (prim.status().state == "sync" and in_step(prim)):
                    await trio.sleep(0.05)
            out = await trio.to_thread.run_sync(orphan_life, app)
            out["link"] = prim.status().link
            rep = await prim.verify()
            out["verify"] = (rep.equal, rep.differences)
            n.cancel_scope.cancel()
        return out

    out = trio.run(main)
    assert out["size"] == 704 and out["truncated"] == 10 and out["mode"] == 0o640
    assert out["read"] == b"scratchscr"
    assert out["b_orphan"] == b"OLD B WRITES"
    assert out["link"] == "connected", "the secondary refused the stream"
    assert out["verify"] == (True, [])
    for b in (b1, b2):
        assert (b / "tmp").read_bytes() == b"the new file"
        assert (b / "b").read_bytes() == b"a"
