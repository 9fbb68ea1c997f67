"""Incremental resync against an Applier: the peer's copy ends equal to the primary's, and
only what the dirty state names travels."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from ha_runtime.replication import delta as D
from ha_runtime.replication import tree
from ha_runtime.replication.activitylog import (
    AL_EXTENT,
    ActivityLog,
    load_activity,
    merge_peer,
    plan_from_wire,
    plan_to_wire,
)
from ha_runtime.replication.dirtylog import DirtyLog
from ha_runtime.replication.journal import DELTA_IN_PLACE, Op, Record, valid_path
from ha_runtime.replication.link.framing import LinkLost
from ha_runtime.replication.link.primary import LinkStats, PrimaryLink
from ha_runtime.replication.resync import full as full_pass
from ha_runtime.replication.resync.full import full_delta
from ha_runtime.replication.resync.incremental import incremental
from ha_runtime.replication.resync.progress import Progress
from ha_runtime.replication.resync.send import CHUNK, RESYNC_WINDOW
from ha_runtime.replication.secondary.applier import Applier


class ApplyingLink:
    """Stands in for PrimaryLink: every submitted record is applied to the peer at once."""

    def __init__(self, applier: Applier) -> None:
        self.applier = applier
        self.records: list[Record] = []

    def submit(self, rec: Record) -> int:
        r = Record(len(self.records) + 1, rec.op, rec.path, rec.path2, rec.offset, rec.length,
                   rec.mode, rec.uid, rec.gid, rec.rdev, rec.atime_ns, rec.mtime_ns, rec.flags,
                   rec.name, rec.data)  # fmt: skip
        self.records.append(r)
        self.applier.apply(r)
        return r.seq

    timeout = 3.0
    wait_progress = PrimaryLink.wait_progress  # the real loop; here every record is acked

    async def room(self) -> None:
        await trio.lowlevel.checkpoint()

    def stats(self) -> LinkStats:
        n = len(self.records)
        return LinkStats(last_seq=n, received_seq=n, durable_seq=n)

    def ping(self) -> None:
        pass

    async def request(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        self.applier.barrier()
        root = self.applier.root
        if obj["op"] == "list":
            paths = obj.get("paths")
            scope = None if paths is None else {os.fsencode(p) for p in paths}
            return {"tree": tree.list_tree(root, scope)}, b""
        assert obj["op"] == "sig"
        return {}, D.signature_file(os.fsencode(root / obj["path"])).encode()


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath, n)
            st = p.lstat()
            if p.is_file():  # (a directory's mtime is not part of the dirty state)
                out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, p.read_bytes())
            else:
                out[str(p.relative_to(root))] = (st.st_mode, 0, b"")
    return out


def test_incremental_rebuilds_the_copy_sending_only_dirty_ranges(tmp_path: Path) -> None:
    prim, peer = tmp_path / "prim", tmp_path / "peer"
    (prim / "d").mkdir(parents=True)
    for i in range(4):
        (prim / f"d/f{i}").write_bytes(bytes([i]) * 300_000)
    shutil.copytree(prim, peer, symlinks=True)
    log = DirtyLog(tmp_path / "dirty")
    log.open()

    def write(rel: str, off: int, data: bytes) -> None:
        p = prim / rel
        log.note(Record(0, Op.WRITE, rel.encode(), offset=off, data=data),
                 lambda: p.stat().st_size if p.exists() else None)  # fmt: skip
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o640)
        os.pwrite(fd, data, off)
        os.close(fd)

    write("d/f0", 1000, b"A" * 5000)  # in place
    write("d/f1", 299_000, b"B" * 4000)  # extends the file
    log.note(Record(0, Op.TRUNCATE, b"d/f2", offset=100))
    os.truncate(prim / "d/f2", 100)  # shrinks: touched
    log.note(Record(0, Op.CREATE, b"d/new"))
    write("d/new", 0, b"N" * 70_000)
    log.note(Record(0, Op.UNLINK, b"d/f3"))
    (prim / "d/f3").unlink()

    applier = Applier(peer)
    link = ApplyingLink(applier)
    progress = Progress()
    trio.run(incremental, link, prim, log.snapshot(), progress)  # type: ignore[arg-type]
    applier.barrier()
    applier.close()
    log.close()

    assert snapshot(peer) == snapshot(prim)
    assert progress.bytes_done == progress.bytes_total == 5000 + 4000 + 70_000
    ops = {(r.op, r.path) for r in link.records}
    # a file only written gets its ranges and metadata, no CREATE/TRUNCATE
    assert (Op.CREATE, b"d/f0") not in ops and (Op.TRUNCATE, b"d/f0") not in ops
    assert (Op.CREATE, b"d/f1") not in ops
    assert {(Op.CREATE, b"d/new"), (Op.TRUNCATE, b"d/f2"), (Op.UNLINK, b"d/f3")} <= ops


class SlowPeerLink:
    """A link whose peer handles ``rate`` bytes every 10 ms and acknowledges receipt only
    when it reaches a keepalive (as a secondary acking by record count does)."""

    timeout = 3.0
    wait_progress = PrimaryLink.wait_progress  # the real loop, woken by _wait_change below

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.sent = 0  # bytes queued so far
        self.handled = 0  # bytes the peer has handled
        self.acked = 0  # bytes the primary knows were received
        self.seq = 0
        self.received_seq = 0
        self.pings: list[tuple[int, int]] = []  # (bytes before it, seq before it)
        self.peak = 0
        self._changed = trio.Event()

    def submit(self, rec: Record) -> int:
        self.seq += 1
        self.sent += len(rec.data) + 100
        self.peak = max(self.peak, self.sent - self.acked)
        return self.seq

    def ping(self) -> None:
        self.pings.append((self.sent, self.seq))

    async def room(self) -> None:
        await trio.lowlevel.checkpoint()

    def stats(self) -> LinkStats:
        return LinkStats(self.seq, self.received_seq, 0, self.sent - self.acked)

    async def _wait_change(self) -> None:
        await self._changed.wait()

    async def peer(self) -> None:
        while True:
            await trio.sleep(0.01)
            self.handled = min(self.sent, self.handled + self.rate)
            while self.pings and self.pings[0][0] <= self.handled:
                self.acked, self.received_seq = self.pings.pop(0)
                self._changed.set()
                self._changed = trio.Event()


def test_incremental_keeps_a_bounded_window_in_flight(tmp_path: Path) -> None:
    """A resync never queues the link's whole allowance (the peer answers keepalives in
    stream order, behind everything queued), and its own keepalives keep the acks coming
    from a peer that acknowledges by count."""
    root = tmp_path / "prim"
    root.mkdir()
    log = DirtyLog(tmp_path / "dirty")
    log.open()
    for i in range(40):
        (root / f"f{i}").write_bytes(b"x" * (1 << 20))
        log.note(Record(0, Op.WRITE, b"f%d" % i, offset=0, length=1 << 20))
    link = SlowPeerLink(rate=1 << 20)  # 100 MiB/s

    async def main() -> None:
        with trio.fail_after(5):  # 40 MiB: 0.4 s, with no stall waiting for an ack
            async with trio.open_nursery() as n:
                n.start_soon(link.peer)
                await incremental(link, root, log.snapshot(), Progress())  # type: ignore[arg-type]
                n.cancel_scope.cancel()

    trio.run(main)
    log.close()
    assert link.peak <= RESYNC_WINDOW + CHUNK + 4096
    assert link.seq >= 40 and link.sent >= 40 << 20


def test_full_resync_of_a_large_file_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(full_pass, "DELTA_PIECE_OUTPUT", 512 << 10)
    prim, peer = tmp_path / "prim", tmp_path / "peer"
    prim.mkdir()
    peer.mkdir()
    body = bytearray(os.urandom(4 << 20))
    (peer / "big").write_bytes(body)
    (peer / "shifted").write_bytes(body)
    (prim / "shifted").write_bytes(b"inserted" + body)  # data moved: rebuilt beside
    for off in range(0, len(body), 300_000):  # scattered changes: patched in place
        body[off : off + 5000] = os.urandom(5000)
    (prim / "big").write_bytes(body)
    (peer / "gone").write_bytes(b"x")
    ino = (peer / "big").stat().st_ino
    applier = Applier(peer)
    link = ApplyingLink(applier)
    trio.run(full_delta, link, prim, Progress())  # type: ignore[arg-type]
    applier.barrier()
    applier.close()
    assert snapshot(peer) == snapshot(prim)
    assert (peer / "big").stat().st_ino == ino
    shifted = [r for r in link.records if r.op == Op.DELTA and r.path == b"shifted"]
    assert len(shifted) >= 8  # bounded output per piece
    assert not any(r.flags & DELTA_IN_PLACE for r in shifted)
    big = [r for r in link.records if r.op == Op.DELTA and r.path == b"big"]
    assert big and all(r.flags & DELTA_IN_PLACE for r in big)


class _Node:
    """A copy and the log its primary notes operations in before performing them."""

    def __init__(self, root: Path, log: DirtyLog | ActivityLog) -> None:
        self.root = root
        self.log = log

    def _note(self, rec: Record) -> None:
        if isinstance(self.log, ActivityLog):
            self.log.sync(self.log.note(rec, acked=0))
            self.log.release(rec, 1)
        else:
            p = self.root / os.fsdecode(rec.path)
            self.log.sync(self.log.note(rec, lambda: p.stat().st_size if p.exists() else None))

    def write(self, rel: str, off: int, data: bytes) -> None:
        if not (self.root / rel).exists():  # as the mount's create() does
            self._note(Record(0, Op.CREATE, rel.encode()))
        self._note(Record(0, Op.WRITE, rel.encode(), offset=off, data=data))
        fd = os.open(self.root / rel, os.O_WRONLY | os.O_CREAT, 0o640)
        os.pwrite(fd, data, off)
        os.close(fd)

    def op(self, rec: Record, fn: Any, *args: Any) -> None:
        self._note(rec)
        fn(*args)


def _two_copies(tmp_path: Path) -> tuple[Path, Path]:
    """Two identical copies (as when last in sync): the old primary's and the new one's."""
    rnd = random.Random(7)
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    (base / "olddir").mkdir()
    for i in range(4):
        (base / f"d/f{i}").write_bytes(rnd.randbytes(300_000))
    (base / "olddir/a").write_bytes(b"a" * 1000)
    (base / "olddir/b").write_bytes(b"b" * 1000)
    (base / "big").write_bytes(rnd.randbytes(5 * AL_EXTENT))
    old, new = tmp_path / "old", tmp_path / "new"  # the returning node; the new primary
    shutil.copytree(base, old, symlinks=True)
    shutil.copytree(base, new, symlinks=True)
    return old, new


def test_returning_primary_gets_only_its_hot_set_and_our_changes(tmp_path: Path) -> None:
    """The old primary crashed in sync with operations its peer never got; the peer, primary
    since, changed things too. Its activity log merged into the new primary's dirty state,
    one incremental pass makes its copy equal, and the untouched bulk does not travel."""
    old, new = _two_copies(tmp_path)
    al = ActivityLog(tmp_path / "m.0.al")
    al.open()
    a = _Node(old, al)  # what the old primary did that never reached the peer
    a.write("big", 3 * AL_EXTENT + 100, b"A" * 5000)
    a.write("d/f1", 299_000, b"B" * 40_000)  # extends the file
    a.op(Record(0, Op.TRUNCATE, b"d/f2", offset=100), os.truncate, old / "d/f2", 100)
    a.write("d/onlyold", 0, b"N" * 7000)
    a.op(Record(0, Op.UNLINK, b"d/f3"), os.unlink, old / "d/f3")
    a.op(Record(0, Op.RENAME, b"olddir", path2=b"moved"), os.rename, old / "olddir",
         old / "moved")  # fmt: skip
    a.op(Record(0, Op.MKDIR, b"d/f0x"), os.mkdir, old / "d/f0x")
    a.op(Record(0, Op.SETATTR, b"d/f0"), os.chmod, old / "d/f0", 0o600)
    os.close(al._fd)  # crash
    (tmp_path / "m.0.dirty").touch()

    dirty = DirtyLog(tmp_path / "new.dirty")
    dirty.open()
    b = _Node(new, dirty)  # what the new primary did since it took over
    b.write("big", 0, b"Z" * 4096)
    b.op(Record(0, Op.RENAME, b"d/f0", path2=b"d/f0x"), os.rename, new / "d/f0", new / "d/f0x")
    b.write("d/newb", 0, b"Q" * 9000)
    b.op(Record(0, Op.MKDIR, b"olddir/sub"), os.mkdir, new / "olddir/sub")

    plan, why = plan_from_wire(
        plan_to_wire(*load_activity(tmp_path / "m.0.al", tmp_path / "m.0.dirty")), valid_path
    )
    assert plan is not None, why
    state = dirty.snapshot()
    merge_peer(state, plan)
    applier = Applier(old)
    link = ApplyingLink(applier)
    progress = Progress()
    trio.run(incremental, link, new, state, progress)  # type: ignore[arg-type]
    applier.barrier()
    applier.close()
    dirty.close()

    assert snapshot(old) == snapshot(new)
    sent: dict[bytes, int] = {}
    for r in link.records:
        sent[r.path] = sent.get(r.path, 0) + len(r.data)
    # big: a checksum delta, so the blocks its 5000 bytes and our own 4 KiB changed (a few
    # 4 KiB blocks), not its hot 4 MiB extent (sent whole before) nor its 20 MiB
    assert sent[b"big"] < 5000 + 4096 + 4 * 4096, sent
    assert sent[b"d/f3"] == 300_000  # it unlinked d/f3, we still have it: it travels whole
    assert sent[b"d/f1"] < 4096, sent  # it extended it: the delta copies, and cuts its tail
    assert b"d/f0" not in {r.path for r in link.records if r.data}  # renamed here: gone
    assert sum(sent.values()) < 2 * AL_EXTENT, sent


def test_full_resync_scoped_to_paths_leaves_the_rest_alone(tmp_path: Path) -> None:
    prim, peer = tmp_path / "prim", tmp_path / "peer"
    (prim / "keep").mkdir(parents=True)
    (prim / "keep/x").write_bytes(b"x" * 100)
    (prim / "s").mkdir()
    (prim / "s/in").write_bytes(b"p" * 100)
    shutil.copytree(prim, peer, symlinks=True)
    (peer / "keep/x").write_bytes(b"different, out of scope")
    (peer / "s/in").write_bytes(b"different")
    (peer / "s/extra").write_bytes(b"only on the peer")
    applier = Applier(peer)
    link = ApplyingLink(applier)
    trio.run(lambda: full_delta(link, prim, Progress(), checksum=True,  # type: ignore[arg-type]
                                 scope={b"s"}))  # fmt: skip
    applier.barrier()
    applier.close()
    assert (peer / "s/in").read_bytes() == b"p" * 100
    assert not (peer / "s/extra").exists()
    assert (peer / "keep/x").read_bytes() == b"different, out of scope"


class RefusingQuarantineLink(ApplyingLink):
    """The peer cannot put its diverging files aside (its quarantine disk is full)."""

    async def request(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        if obj["op"] == "quarantine":
            return {"error": "big: No space left on device", "copied": 0}, b""
        return await super().request(obj)


def test_a_split_brain_resync_stops_when_the_peer_could_not_quarantine(tmp_path: Path) -> None:
    # Never overwrite what the yielding side could not keep aside: the diverging files are
    # the only copy of what it wrote during the split.
    prim, peer = tmp_path / "prim", tmp_path / "peer"
    prim.mkdir()
    peer.mkdir()
    (prim / "big").write_bytes(b"primary's")
    (peer / "big").write_bytes(b"written by the peer during the split")
    applier = Applier(peer)
    link = RefusingQuarantineLink(applier)
    with pytest.raises(LinkLost, match="quarantine"):
        trio.run(lambda: full_delta(link, prim, Progress(), checksum=True,  # type: ignore[arg-type]
                                     quarantine=True))  # fmt: skip
    applier.close()
    assert (peer / "big").read_bytes() == b"written by the peer during the split"


def _many_small_changes(tmp_path: Path) -> tuple[Path, Path, DirtyLog]:
    """A tree of small files, then what changed while the peer was away: ranges in most,
    some removed, some created, one file with more than a batch of dirty bytes."""
    prim, peer = tmp_path / "prim", tmp_path / "peer"
    rnd = random.Random(11)
    for i in range(60):
        (prim / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (prim / f"d{i % 4}/f{i}").write_bytes(rnd.randbytes(30_000))
    (prim / "big").write_bytes(rnd.randbytes(3 << 20))
    shutil.copytree(prim, peer, symlinks=True)
    log = DirtyLog(tmp_path / "dirty")
    log.open()

    def write(rel: str, off: int, data: bytes) -> None:
        p = prim / rel
        log.note(Record(0, Op.WRITE, rel.encode(), offset=off, data=data),
                 lambda: p.stat().st_size if p.exists() else None)  # fmt: skip
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o640)
        os.pwrite(fd, data, off)
        os.close(fd)

    for i in range(0, 50):
        write(f"d{i % 4}/f{i}", rnd.randrange(0, 20_000), rnd.randbytes(15_000))
    for i in range(50, 55):
        log.note(Record(0, Op.UNLINK, f"d{i % 4}/f{i}".encode()))
        (prim / f"d{i % 4}/f{i}").unlink()
    log.note(Record(0, Op.MKDIR, b"new"))
    (prim / "new").mkdir()
    for j in range(8):
        log.note(Record(0, Op.CREATE, f"new/n{j}".encode()))
        write(f"new/n{j}", 0, rnd.randbytes(40_000))
    write("big", 100, rnd.randbytes(2 << 20))
    return prim, peer, log


def test_incremental_in_batches_rebuilds_the_copy_in_few_records(tmp_path: Path) -> None:
    prim, peer, log = _many_small_changes(tmp_path)
    applier = Applier(peer)
    link = ApplyingLink(applier)
    progress = Progress(batch=True)  # the peer said it applies BATCH records
    trio.run(incremental, link, prim, log.snapshot(), progress)  # type: ignore[arg-type]
    applier.barrier()
    applier.close()
    log.close()
    assert snapshot(peer) == snapshot(prim)
    ops = [r.op for r in link.records]
    # the small files' records travel packed; the large file's ranges one record per MiB
    assert ops.count(Op.BATCH) <= 20
    assert [r.path for r in link.records if r.op != Op.BATCH] == [b"big"] * 3
    assert progress.bytes_done == progress.bytes_total


class CutLink(ApplyingLink):  # type: ignore[misc,valid-type]
    """The link is lost at its ``n``-th record: the records before it were applied."""

    def __init__(self, applier: Applier, n: int) -> None:
        super().__init__(applier)
        self.n = n

    def submit(self, rec: Record) -> int:
        if len(self.records) + 1 >= self.n:
            raise LinkLost("cut")
        return int(super().submit(rec))


def test_a_batched_resync_cut_anywhere_leaves_the_dirty_log_covering_the_rest(
    tmp_path: Path,
) -> None:
    """Cut at every record of a batched resync: the pass never drops an entry of the dirty
    log (only the final barrier's acknowledgement does, in the service), so the next resync
    from that log makes the copies equal wherever the first one stopped."""
    base = tmp_path / "base"
    base.mkdir()
    prim, peer, log = _many_small_changes(base)
    before = log.snapshot()
    full = ApplyingLink(Applier(tmp_path / "scratch"))
    shutil.copytree(peer, tmp_path / "scratch", dirs_exist_ok=True)
    trio.run(incremental, full, prim, log.snapshot(), Progress(batch=True))  # type: ignore[arg-type]
    full.applier.close()
    total = len(full.records)
    assert total >= 6
    for n in range(1, total + 1):
        cut_peer = tmp_path / f"peer{n}"
        shutil.copytree(peer, cut_peer, symlinks=True)
        applier = Applier(cut_peer)
        with pytest.raises(LinkLost):
            trio.run(incremental, CutLink(applier, n), prim, log.snapshot(), Progress(batch=True))  # type: ignore[arg-type]
        applier.close()
        if n > 1:
            assert snapshot(cut_peer) != snapshot(prim)  # half-way: not yet equal
        state = log.snapshot()
        assert (state.ranges, state.touched) == (before.ranges, before.touched)
        again = Applier(cut_peer)
        trio.run(incremental, ApplyingLink(again), prim, state, Progress(batch=True))  # type: ignore[arg-type]
        again.barrier()
        again.close()
        assert snapshot(cut_peer) == snapshot(prim), n
    log.close()
