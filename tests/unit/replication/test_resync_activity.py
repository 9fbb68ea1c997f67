"""Resync while the application keeps working: rotating, replacing, removing files and
directories under it. Every OSError on a path means "changed meanwhile": the resync goes
on, reconciles the path again, and the peer's copy ends equal to the primary's.

The primary's side is the real resync code and a real DirtyLog; the peer is a real Applier
applying the stream in order (the application's own operations join that stream at the
moment they happen, as the FUSE layer's after() submits them)."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.replication import resync
from ha_runtime.replication.dirtylog import DirtyLog
from ha_runtime.replication.journal import Op, Record
from ha_runtime.replication.link.framing import LinkLost
from ha_runtime.replication.resync.progress import Progress, hold
from ha_runtime.replication.resync.send import NOW_BYTES
from ha_runtime.replication.resync.settle import SETTLE_ROUNDS
from ha_runtime.replication.secondary.applier import Applier

_spec = importlib.util.spec_from_file_location(
    "resync_tests", Path(__file__).parent / "test_resync.py"
)
assert _spec and _spec.loader
_rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rt)
ApplyingLink, snapshot = _rt.ApplyingLink, _rt.snapshot


class LiveLink(ApplyingLink):  # type: ignore[misc,valid-type]
    """The applying link, with the application acting at a chosen moment of the resync:
    ``on_room[n]`` runs before the n-th backpressure wait, ``on_sig[path]`` while the
    peer computes that file's signature."""

    lost_reason: str | None = None

    def __init__(self, applier: Applier) -> None:
        super().__init__(applier)
        self.rooms = 0
        self.on_room: dict[int, Callable[[], None]] = {}
        self.on_sig: dict[str, Callable[[], None]] = {}
        self.on_list: Callable[[], None] | None = None
        self.every_room: Callable[[], None] | None = None

    async def room(self) -> None:
        self.rooms += 1
        act = self.on_room.pop(self.rooms, None) or self.every_room
        if act:
            act()
        await trio.lowlevel.checkpoint()

    def fail(self, reason: str) -> None:
        self.lost_reason = self.lost_reason or reason

    async def request(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        if obj["op"] == "list" and self.on_list:
            self.on_list()
        try:
            reply: tuple[dict[str, Any], bytes] = await super().request(obj)
        except OSError as e:  # as the secondary's session answers a failed control
            reply = {"error": str(e)}, b""
        act = self.on_sig.pop(obj.get("path", ""), None) if obj["op"] == "sig" else None
        if act:
            act()  # the file changes between its signature and its delta
        return reply


class App:
    """The application writing through the primary's mount: each operation is noted in the
    dirty log (resyncing: before()), performed on the backing directory, then shipped in
    stream order (after())."""

    def __init__(self, root: Path, log: DirtyLog, link: LiveLink) -> None:
        self.root, self.log, self.link = root, log, link
        self.progress: Progress | None = None  # the resync in progress

    def _do(self, rec: Record, fn: Callable[[], object]) -> None:
        self.log.sync(self.log.note(rec))
        fn()
        # as the service's after(): held back while the resync has yet to reconcile it
        if self.progress is None or not hold(self.progress, rec):
            self.link.submit(rec)

    def write(self, rel: str, data: bytes) -> None:
        p = self.root / rel
        if not p.exists():
            self._do(Record(0, Op.CREATE, rel.encode(), mode=0o100644), lambda: p.touch(0o644))
        self._do(Record(0, Op.WRITE, rel.encode(), offset=0, data=data),
                 lambda: p.write_bytes(data))  # fmt: skip

    def rename(self, src: str, dst: str) -> None:
        self._do(Record(0, Op.RENAME, src.encode(), path2=dst.encode()),
                 lambda: os.rename(self.root / src, self.root / dst))  # fmt: skip

    def rmtree(self, rel: str) -> None:
        top = self.root / rel
        for dirpath, dirs, files in os.walk(top, topdown=False):
            for n in files:
                p = Path(dirpath, n)
                self._do(Record(0, Op.UNLINK, os.fsencode(p.relative_to(self.root))), p.unlink)
            for n in dirs:
                p = Path(dirpath, n)
                self._do(Record(0, Op.RMDIR, os.fsencode(p.relative_to(self.root))), p.rmdir)
        self._do(Record(0, Op.RMDIR, rel.encode()), top.rmdir)

    def mkdir(self, rel: str) -> None:
        self._do(Record(0, Op.MKDIR, rel.encode(), mode=0o40755), (self.root / rel).mkdir)


def _pair(tmp: Path) -> tuple[Path, Path, DirtyLog, Applier, LiveLink, App]:
    prim, peer = tmp / "prim", tmp / "peer"
    (prim / "d").mkdir(parents=True)
    (prim / "logs").mkdir()
    for i in range(3):
        (prim / f"d/x{i}").write_bytes(os.urandom(100_000))
    (prim / "logs/app.log").write_bytes(os.urandom(300_000))
    (prim / "logs/app.log.1").write_bytes(os.urandom(300_000))
    (prim / "a").write_bytes(os.urandom(200_000))
    shutil.copytree(prim, peer, symlinks=True)
    log = DirtyLog(tmp / "dirty")
    log.open()
    applier = Applier(peer)
    link = LiveLink(applier)
    return prim, peer, log, applier, link, App(prim, log, link)


def _run(
    link: LiveLink, prim: Path, log: DirtyLog, full: bool, app: App, *, batch: bool = False
) -> Progress:
    """What the primary's session does: the pass, then what changed meanwhile, settled
    (``batch``: the peer applies BATCH records)."""
    progress = app.progress = Progress(batch=batch)
    state = log.snapshot(watch=True)

    async def main() -> None:
        await resync.run(link, prim, state, progress, full=full, changes=log.take_watch)  # type: ignore[arg-type]

    trio.run(main)
    return progress


def test_incremental_survives_a_directory_replaced_by_a_file(tmp_path: Path) -> None:
    prim, peer, log, applier, link, app = _pair(tmp_path)
    for rel in ("a", "d/x0", "d/x1"):
        log.note(Record(0, Op.WRITE, rel.encode(), offset=0, length=50_000))
        data = os.urandom(50_000)
        with open(prim / rel, "r+b") as f:
            f.write(data)

    def replace_dir() -> None:  # rm -rf d && echo > d, while the resync is at "a"
        app.rmtree("d")
        app.write("d", b"now a file")

    link.on_room[2] = replace_dir
    _run(link, prim, log, full=False, app=app)
    applier.barrier()
    applier.close()
    assert not link.on_room, "the application never acted"
    assert snapshot(peer) == snapshot(prim)


def test_full_resync_survives_rotation_and_a_tree_recreated(tmp_path: Path) -> None:
    prim, peer, log, applier, link, app = _pair(tmp_path)
    # the peer's copy differs everywhere (a full resync: its state is unknown)
    for p in peer.rglob("*"):
        if p.is_file():
            p.write_bytes(os.urandom(p.stat().st_size))

    def rotate() -> None:  # logrotate: .1 -> .2 (a name the pass does not know), the log
        # -> .1 (over a name the pass is at), a new log (a name it is done with)
        app.rename("logs/app.log.1", "logs/app.log.2")
        app.rename("logs/app.log", "logs/app.log.1")
        app.write("logs/app.log", os.urandom(70_000))

    def delete() -> None:  # rotated away while its delta is made
        app._do(Record(0, Op.UNLINK, b"a"), (prim / "a").unlink)

    def recreate() -> None:  # rm -rf d && mkdir d && new files
        app.rmtree("d")
        app.mkdir("d")
        app.write("d/x0", os.urandom(90_000))
        app.write("d/fresh", b"f" * 1000)

    link.on_sig["logs/app.log.1"] = rotate
    link.on_sig["a"] = delete
    link.on_sig["d/x1"] = recreate
    _run(link, prim, log, full=True, app=app)
    applier.barrier()
    applier.close()
    assert not link.on_sig, "the application never acted"
    assert snapshot(peer) == snapshot(prim)


def test_full_resync_survives_a_file_replaced_by_a_directory_during_its_delta(
    tmp_path: Path,
) -> None:
    prim, peer, log, applier, link, app = _pair(tmp_path)
    (peer / "a").write_bytes(os.urandom(200_000))

    def replace() -> None:
        app._do(Record(0, Op.UNLINK, b"a"), (prim / "a").unlink)
        app.mkdir("a")
        app.write("a/inside", b"i" * 10)

    link.on_sig["a"] = replace
    _run(link, prim, log, full=True, app=app)
    applier.barrier()
    applier.close()
    assert not link.on_sig
    assert snapshot(peer) == snapshot(prim)


def test_a_resync_that_cannot_settle_is_a_link_failure_not_a_loop(tmp_path: Path) -> None:
    """An application renaming the names being reconciled, all the time: the session gives
    up after SETTLE_ROUNDS (a link failure: it starts over after a backoff), it does not
    spin forever."""
    prim, _peer, log, applier, link, app = _pair(tmp_path)
    flip = [0]

    def rename_again() -> None:
        src, dst = ("a", "b") if flip[0] % 2 == 0 else ("b", "a")
        app.rename(src, dst)
        flip[0] += 1

    link.every_room = rename_again
    with pytest.raises(LinkLost, match="kept renaming"):
        _run(link, prim, log, full=True, app=app)
    applier.close()
    assert link.lost_reason and flip[0] >= SETTLE_ROUNDS


# --------------------------------------------------------------------------- property


def _content(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path's mode and, for files, data (what ``hactl verify`` compares, and more)."""
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, p.read_bytes() if p.is_file() else b"")
        for p in root.rglob("*")
    }


NAMES = ["a", "b", "d", "d/x", "d/y", "e", "e/z"]


def _random_action(app: App, rnd: random.Random) -> None:
    """One operation of an application, valid for the primary's tree as it is now."""
    root = app.root
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    dirs = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())
    kind = rnd.choice(["write", "write", "rename", "rmtree", "swap", "truncate", "new"])
    if kind == "write" and files:
        f = rnd.choice(files)
        off = rnd.randrange(0, 300_000)
        data = rnd.randbytes(rnd.choice([100, 5000, 70_000]))
        rec = Record(0, Op.WRITE, f.encode(), offset=off, data=data)

        def pwrite() -> None:
            with open(root / f, "r+b") as fh:
                fh.seek(off)
                fh.write(data)

        app._do(rec, pwrite)
    elif kind == "rename" and files:
        src = rnd.choice(files)
        dst = rnd.choice([n for n in [*files, "a", "b", "d/x", "e/z"] if n != src])
        parent = (root / dst).parent
        if parent.is_dir() and not (root / dst).is_dir():
            app.rename(src, dst)
    elif kind == "rmtree" and dirs:
        app.rmtree(rnd.choice(dirs))
    elif kind == "swap":  # a directory replaced by a file, or a file by a directory
        n = rnd.choice(["d", "e"])
        if (root / n).is_dir():
            app.rmtree(n)
            app.write(n, rnd.randbytes(1000))
        elif (root / n).exists():
            app._do(Record(0, Op.UNLINK, n.encode()), (root / n).unlink)
            app.mkdir(n)
        else:
            app.mkdir(n)
    elif kind == "truncate" and files:
        f = rnd.choice(files)
        size = rnd.randrange(0, 200_000)
        app._do(Record(0, Op.TRUNCATE, f.encode(), offset=size),
                lambda: os.truncate(root / f, size))  # fmt: skip
    else:
        n = rnd.choice(NAMES)
        if (root / n).parent.is_dir() and not (root / n).exists():
            app.write(n, rnd.randbytes(rnd.choice([10, 90_000, 300_000])))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    full=st.booleans(),
    moments=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    batch=st.booleans(),
)
def test_any_activity_during_a_resync_leaves_the_copies_equal(
    seed: int, full: bool, moments: list[int], batch: bool
) -> None:
    """Random operations of the application at random moments of a resync (backpressure
    waits, signatures, listings): the resync completes and the copies end equal, with the
    resync's records packed in batches or not."""
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        prim, peer, log, applier, link, app = _pair(Path(tmp))
        for rel in ("a", "d/x0", "logs/app.log"):  # what changed while the peer was away
            log.note(Record(0, Op.WRITE, rel.encode(), offset=0, length=60_000))
            with open(prim / rel, "r+b") as f:
                f.write(rnd.randbytes(60_000))
        if full:
            for p in peer.rglob("*"):
                if p.is_file() and rnd.random() < 0.5:
                    p.write_bytes(rnd.randbytes(p.stat().st_size))
        for m in moments:
            link.on_room[m] = lambda: _random_action(app, rnd)
        for rel in ("a", "d/x1", "logs/app.log.1"):
            link.on_sig[rel] = lambda: _random_action(app, rnd)
        link.on_list = lambda: _random_action(app, rnd) if rnd.random() < 0.5 else None
        try:
            _run(link, prim, log, full=full, app=app, batch=batch)
        except LinkLost:
            # gave up after SETTLE_ROUNDS (renamed on every round): the session starts over,
            # the dirty log still holds everything; not a divergence, but say so if common
            assert link.lost_reason
            return
        finally:
            applier.barrier()
            applier.close()
            log.close()
        # (times are not compared: the application's own operations set the peer's times
        # when they are applied there, as on a live link)
        assert _content(peer) == _content(prim)


def test_renames_recorded_while_the_peer_was_away_replay_only_where_they_hold(
    tmp_path: Path,
) -> None:
    """logrotate while the peer was away: the log it never had is renamed, a new one made,
    and a file moved into a directory made meanwhile. Replaying those renames failed on the
    peer (no such file), the link dropped, and every reconnection repeated it."""
    prim, peer, log, applier, link, app = _pair(tmp_path)
    app.progress = None

    def alone(rec: Record, fn: Callable[[], object]) -> None:  # noted, not shipped
        log.sync(log.note(rec))
        fn()

    lg = prim / "logs"
    alone(Record(0, Op.CREATE, b"logs/new.log"), lambda: (lg / "new.log").write_bytes(b""))
    alone(Record(0, Op.WRITE, b"logs/new.log", offset=0, length=5000),
          lambda: (lg / "new.log").write_bytes(b"n" * 5000))  # fmt: skip
    alone(Record(0, Op.RENAME, b"logs/new.log", path2=b"logs/new.log.1"),
          lambda: os.rename(lg / "new.log", lg / "new.log.1"))  # fmt: skip
    alone(Record(0, Op.RENAME, b"logs/app.log", path2=b"logs/app.log.1"),
          lambda: os.rename(lg / "app.log", lg / "app.log.1"))  # fmt: skip
    alone(Record(0, Op.MKDIR, b"arch"), (prim / "arch").mkdir)
    alone(Record(0, Op.RENAME, b"logs/app.log.1", path2=b"arch/app.log.1"),
          lambda: os.rename(lg / "app.log.1", prim / "arch/app.log.1"))  # fmt: skip
    _run(link, prim, log, full=False, app=app)
    applier.barrier()
    applier.close()
    assert snapshot(peer) == snapshot(prim)
    # the one rename that holds on the peer's copy traveled as a rename, not its data
    assert any(r.op == Op.RENAME and r.path == b"logs/app.log" for r in link.records)
    assert not any(r.path == b"logs/new.log.1" and r.op == Op.RENAME for r in link.records)


def test_a_rename_in_a_directory_made_while_the_peer_was_away(tmp_path: Path) -> None:
    """An atomic save (write x.tmp, rename over x) in a directory made while the peer was
    away: the rename does not hold on the peer (a checksum delta of both names instead),
    whose CREATE failed there when it came before the directory (lab: CREATE
    churn/save0: no such file or directory, the resync started over forever)."""
    prim, peer, log, applier, link, app = _pair(tmp_path)
    app.progress = None

    def alone(rec: Record, fn: Callable[[], object]) -> None:
        log.sync(log.note(rec))
        fn()

    alone(Record(0, Op.MKDIR, b"new"), (prim / "new").mkdir)
    alone(Record(0, Op.CREATE, b"new/x.tmp"), (prim / "new/x.tmp").touch)
    alone(Record(0, Op.WRITE, b"new/x.tmp", offset=0, length=3000),
          lambda: (prim / "new/x.tmp").write_bytes(b"s" * 3000))  # fmt: skip
    alone(Record(0, Op.RENAME, b"new/x.tmp", path2=b"new/x"),
          lambda: os.rename(prim / "new/x.tmp", prim / "new/x"))  # fmt: skip
    _run(link, prim, log, full=False, app=app)
    applier.barrier()
    applier.close()
    assert snapshot(peer) == snapshot(prim)
    # the directory reaches the peer before anything in it (the secondary refuses the rest)
    order = [(r.op, r.path) for r in link.records if r.path in (b"new", b"new/x")]
    assert order[0] == (Op.MKDIR, b"new"), order


@pytest.mark.parametrize("batch", [False, True])
def test_appends_to_a_large_new_file_wait_for_it_to_reach_the_peer(
    tmp_path: Path, batch: bool
) -> None:
    """A file made while the peer was away, with more than NOW_BYTES to send, appended to
    throughout the resync: no append reaches the peer before the file does. One did (lab,
    test_resync_under_load: `cannot apply WRITE b'records': no such file`, the link
    dropped, the resync started over): the pass marked the file reconciled, found it too
    large to queue at once, and waited for room before queueing its CREATE; an append in
    that wait was shipped."""
    prim, peer, log, applier, link, app = _pair(tmp_path)
    app.progress = None
    big = prim / "records"
    size = NOW_BYTES + 300_000
    log.sync(log.note(Record(0, Op.CREATE, b"records", mode=0o100644)))
    log.sync(log.note(Record(0, Op.WRITE, b"records", offset=0, length=size)))
    big.write_bytes(os.urandom(size))
    appends = [0]

    def append() -> None:  # the application's next record, at every wait of the pass
        if appends[0] < 40:
            appends[0] += 1
            off = big.stat().st_size
            data = os.urandom(100)

            def write() -> None:
                with open(big, "r+b") as f:
                    f.seek(off)
                    f.write(data)

            app._do(Record(0, Op.WRITE, b"records", offset=off, data=data), write)

    link.every_room = append
    _run(link, prim, log, full=False, app=app, batch=batch)
    applier.barrier()
    applier.close()
    assert appends[0] > 0, "the application never acted"
    assert snapshot(peer) == snapshot(prim)
    first = next(r.op for r in link.records if r.path == b"records")
    assert first == Op.CREATE, first
