"""Activity log: hot entries, group commit, the bound, crash survival, the report a
returning primary sends, and the fallback to a full resync when it cannot be trusted."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.replication import recordlog
from ha_runtime.replication.activitylog import (
    AL_EXTENT,
    AL_OVERFLOW_FACTOR,
    META,
    TAIL,
    WHOLE,
    ActivityLog,
    load_activity,
    merge_peer,
    plan_from_wire,
    plan_to_wire,
)
from ha_runtime.replication.dirtylog import INF, DirtyLog
from ha_runtime.replication.journal import Op, Record, valid_path
from ha_runtime.replication.recordlog import TORN_MAX


def _w(path: bytes, off: int, n: int) -> Record:
    return Record(0, Op.WRITE, path, offset=off, data=b"x" * n)


def _logs(tmp_path: Path, extents: int = 1024) -> tuple[ActivityLog, Path, Path]:
    al_path, dirty_path = tmp_path / "m.0.al", tmp_path / "m.0.dirty"
    al = ActivityLog(al_path, extents=extents)
    al.open()
    dirty_path.touch()  # the node was primary: its (empty) dirty log exists
    return al, al_path, dirty_path


def test_only_a_new_entry_costs_a_record_and_an_fsync(tmp_path: Path) -> None:
    al, _, _ = _logs(tmp_path)
    pos = al.note(_w(b"db", 0, 4096), acked=0)
    assert pos > 0
    al.sync(pos)
    al.release(_w(b"db", 0, 4096), 1)
    size = al.size
    # the 4 KiB write + fdatasync benchmark: the same block again and again
    for seq in range(2, 200):
        assert al.note(_w(b"db", 0, 4096), acked=seq - 1) == 0
        al.release(_w(b"db", 0, 4096), seq)
    assert al.size == size
    # anywhere else in the same 4 MiB extent: still free
    assert al.note(_w(b"db", AL_EXTENT - 10, 10), acked=0) == 0
    # a write across an extent boundary makes the next one hot too (one new record)
    assert al.note(_w(b"db", AL_EXTENT - 10, 20), acked=0) > 0
    assert set(al.state.hot) == {(b"db", 0), (b"db", 1)}
    assert al.size > size
    al.close()


def test_a_stream_makes_extents_ahead_hot_with_one_fsync(tmp_path: Path) -> None:
    """256 MiB written 1 MiB at a time paid 64 records and fsyncs (one per new 4 MiB
    extent). A run of contiguous writes entering a new extent makes as many extents ahead
    hot as it has written (up to AL_AHEAD) in the same batch."""
    al, _, _ = _logs(tmp_path)
    waits = 0
    for i in range(256):
        rec = _w(b"big", i << 20, 1 << 20)
        pos = al.note(rec, acked=0)
        if pos:
            waits += 1
            al.sync(pos)
        al.release(rec, i + 1)
    assert waits == 8  # entering extents 0, 1, 3, 7, 15, 31, 47 and 63
    assert {k for k in al.state.hot if k[0] == b"big"} == {(b"big", i) for i in range(79)}
    # Random 4 KiB rewrites, even two adjacent ones across an extent boundary, make only
    # their own extents hot: the lab's crash test (4 KiB rewrites in a 256 MiB file) saw
    # 60 MiB more resynced when any contiguous pair looked ahead.
    for n, off in enumerate((7, 200, 3, 150, 90, 40)):
        al.note(_w(b"db", off * AL_EXTENT + 4096 * n, 4096), acked=0)
    al.note(_w(b"db", 100 * AL_EXTENT - 4096, 4096), acked=0)
    al.note(_w(b"db", 100 * AL_EXTENT, 4096), acked=0)
    assert {k[1] for k in al.state.hot if k[0] == b"db"} == {7, 200, 3, 150, 90, 40, 99, 100}
    al.close()


def test_namespace_operations_record_whole_paths(tmp_path: Path) -> None:
    al, _, _ = _logs(tmp_path)
    for rec in (
        Record(0, Op.CREATE, b"d/new"),
        Record(0, Op.RENAME, b"d/a", path2=b"d/b"),
        Record(0, Op.LINK, b"d/x", path2=b"d/y"),
        Record(0, Op.SYMLINK, b"d/s", path2=b"/elsewhere"),  # path2: a target, not a name
        Record(0, Op.SETATTR, b"d/m", mode=0o600),
        Record(0, Op.SETXATTR, b"d/m", name=b"user.a", data=b"1"),
        Record(0, Op.TRUNCATE, b"d/t", offset=100),
        Record(0, Op.TRUNCATE, b"d/t", offset=500),  # covered by the lower size
    ):
        al.note(rec, acked=0)
    assert set(al.state.hot) == {
        (b"d/new", WHOLE), (b"d/a", WHOLE), (b"d/b", WHOLE), (b"d/x", WHOLE),
        (b"d/y", WHOLE), (b"d/s", WHOLE), (b"d/m", META), (b"d/t", TAIL),
    }  # fmt: skip
    assert al.state.hot[(b"d/t", TAIL)].offset == 100
    assert al.note(Record(0, Op.TRUNCATE, b"d/t", offset=0), acked=0) > 0  # lower: new record
    assert al.state.hot[(b"d/t", TAIL)].offset == 0
    assert al.note(Record(0, Op.FSYNC, b"d/t"), acked=0) == 0
    al.close()


def test_a_pending_entry_makes_every_user_wait_for_it(tmp_path: Path) -> None:
    al, _, _ = _logs(tmp_path)
    first = al.note(_w(b"db", 0, 10), acked=0)
    assert first > 0
    # a second operation on the same extent while the first waits for the fsync
    assert al.note(_w(b"db", 100, 10), acked=0) == first
    al.sync(first)
    assert al.note(_w(b"db", 100, 10), acked=0) == 0
    al.close()


def test_concurrent_new_entries_share_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    al, _, _ = _logs(tmp_path)
    calls = []
    real = os.fsync

    def slow_fsync(fd: int) -> None:
        calls.append(fd)
        time.sleep(0.05)
        real(fd)

    monkeypatch.setattr(recordlog.os, "fsync", slow_fsync)
    positions = [al.note(_w(b"f%d" % i, 0, 10), acked=0) for i in range(16)]
    assert all(positions) and len(set(positions)) == 16
    threads = [threading.Thread(target=al.sync, args=(p,)) for p in positions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # one fsync covers everything written when it started: at most one more for stragglers
    assert 1 <= len(calls) <= 2, calls
    assert all(al.note(_w(b"f%d" % i, 0, 10), acked=0) == 0 for i in range(16))
    al.close()


def test_the_bound_forgets_only_entries_the_peer_made_durable(tmp_path: Path) -> None:
    al, _, _ = _logs(tmp_path, extents=4)
    for i in range(8):
        rec = _w(b"f", i * AL_EXTENT, 1)
        al.note(rec, acked=0)
        al.release(rec, i + 1)  # travels as seq i+1
    assert len(al.state.hot) == 8  # nothing acknowledged: nothing may be forgotten
    pinned = _w(b"f", 0, 1)
    al.note(pinned, acked=0)  # extent 0 in use again (not yet released)
    rec = _w(b"g", 0, 1)
    al.note(rec, acked=5)  # seqs 1..5 durable on the peer: extents 0..4 may go
    al.release(rec, 9)
    hot = set(al.state.hot)
    # the bound is 4: the least recently used acknowledged ones went; extent 0 is pinned
    assert (b"f", 0) in hot and (b"g", 0) in hot
    assert {(b"f", 5), (b"f", 6), (b"f", 7)} <= hot  # not acknowledged yet
    assert len(hot) == 5  # (4 + the pinned one, which stays over the bound)
    al.release(pinned, 10)
    al.close()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        # (extent written, acknowledgements that arrive after it)
        st.tuples(st.integers(0, 7), st.sampled_from([0, 0, 0, 1, 2])),
        min_size=1,
        max_size=60,
    )
)
def test_never_forgets_what_the_peer_may_lack(ops: list[tuple[int, int]]) -> None:
    """Whatever the order of writes and acknowledgements: every extent written by an
    operation the peer has not made durable is hot (and on disk, once synced)."""
    import tempfile  # noqa: PLC0415 (hypothesis: one fresh directory per example)

    with tempfile.TemporaryDirectory() as d:
        al = ActivityLog(Path(d) / "al", extents=2)
        al.open()
        acked = 0
        last_seq: dict[int, int] = {}
        for seq, (extent, acks) in enumerate(ops, start=1):
            rec = _w(b"f", extent * AL_EXTENT, 1)
            al.sync(al.note(rec, acked=acked))
            al.release(rec, seq)
            last_seq[extent] = seq
            acked = min(seq, acked + acks)
            unsafe = {e for e, s in last_seq.items() if s > acked}
            assert {(b"f", e) for e in unsafe} <= set(al.state.hot)
        os.close(al._fd)  # crash
        plan, why = load_activity(Path(d) / "al", _touch(Path(d) / "dirty"))
        assert plan is not None, why
        for e in unsafe:
            assert plan.ranges[b"f"].covers(e * AL_EXTENT, (e + 1) * AL_EXTENT)


def _touch(p: Path) -> Path:
    p.touch()
    return p


def test_survives_a_crash_and_reports_its_hot_set(tmp_path: Path) -> None:
    al, al_path, dirty_path = _logs(tmp_path)
    for rec in (
        _w(b"db", 5 * AL_EXTENT + 7, 4096),
        Record(0, Op.TRUNCATE, b"log", offset=300),
        Record(0, Op.RENAME, b"tmp.1", path2=b"cur"),
        Record(0, Op.SETATTR, b"db", mode=0o600),
    ):
        al.sync(al.note(rec, acked=0))
    os.close(al._fd)  # crash: no orderly close
    with open(al_path, "ab") as f:
        f.write(b"\x00\x01torn")  # a record half written when the power went
    plan, why = load_activity(al_path, dirty_path)
    assert plan is not None, why
    assert list(plan.ranges[b"db"]) == [(5 * AL_EXTENT, 6 * AL_EXTENT)]
    assert list(plan.ranges[b"log"]) == [(300, INF)]
    assert plan.touched == {b"db", b"log"}
    assert plan.scope == {b"tmp.1", b"cur"}
    # reopened (a primary starting again): the same entries, the torn tail dropped
    again = ActivityLog(al_path)
    again.open()
    assert set(again.state.hot) == {
        (b"db", 5), (b"log", TAIL), (b"tmp.1", WHOLE), (b"cur", WHOLE), (b"db", META),
    }  # fmt: skip
    again.close()


def test_the_report_travels_and_is_checked(tmp_path: Path) -> None:
    al, al_path, dirty_path = _logs(tmp_path)
    al.sync(al.note(_w(b"a/b", 0, 1), acked=0))
    al.sync(al.note(Record(0, Op.UNLINK, b"a/\xffodd"), acked=0))
    al.close()
    wire = plan_to_wire(*load_activity(al_path, dirty_path))
    plan, why = plan_from_wire(wire, valid_path)
    assert plan is not None, why
    assert plan.scope == {b"a/\xffodd"}  # any bytes survive the JSON
    assert list(plan.ranges[b"a/b"]) == [(0, AL_EXTENT)]
    for bad in (
        None,
        {"state": "unusable", "why": "its activity log is damaged"},
        {"state": "intact", "scope": ["../../etc/passwd"]},
        {"state": "intact", "ranges": [["x", "0", 1]]},
        {"state": "intact", "ranges": [["x", 0]]},
    ):
        plan, why = plan_from_wire(bad, valid_path)
        assert plan is None and why, bad


def test_missing_damaged_or_overflowed_log_means_a_full_resync(tmp_path: Path) -> None:
    al, al_path, dirty_path = _logs(tmp_path)
    al.sync(al.note(_w(b"f", 0, 1), acked=0))
    al.close()
    assert load_activity(al_path, dirty_path)[0] is not None
    # damaged: more garbage than one torn record
    with open(al_path, "ab") as f:
        f.write(os.urandom(TORN_MAX + 100))
    plan, why = load_activity(al_path, dirty_path)
    assert plan is None and "damaged" in why
    # missing (a runtime without an activity log was primary here)
    al_path.unlink()
    plan, why = load_activity(al_path, dirty_path)
    assert plan is None and "missing" in why
    # overflowed: more unacknowledged entries than it may hold
    al = ActivityLog(al_path, extents=2)
    al.open()
    for i in range(2 * AL_OVERFLOW_FACTOR + 1):
        al.sync(al.note(_w(b"f", i * AL_EXTENT, 1), acked=0))
    assert al.state.overflow
    assert al.note(_w(b"g", 0, 1), acked=0) == 0  # stopped recording
    al.close()
    plan, why = load_activity(al_path, dirty_path)
    assert plan is None and "overflow" in why
    # its dirty log lost (never synced, or damaged)
    al_path.unlink()
    ActivityLog(al_path).open()
    d = DirtyLog(dirty_path)
    d.open()
    d.mark_lost()
    d.sync()
    d.close()
    plan, why = load_activity(al_path, dirty_path)
    assert plan is None and "dirty log" in why


def test_dirty_log_entries_join_the_report(tmp_path: Path) -> None:
    """Lost its link then crashed before the manager moved on: what it did alone counts."""
    al, al_path, dirty_path = _logs(tmp_path)
    al.close()
    d = DirtyLog(dirty_path)
    d.open()
    d.note(_w(b"x", 10, 10))
    d.note(Record(0, Op.RENAME, b"p", path2=b"q"))
    d.sync()
    d.close()
    plan, why = load_activity(al_path, dirty_path)
    assert plan is not None, why
    assert list(plan.ranges[b"x"]) == [(10, 20)]
    assert {b"p", b"q"} <= plan.scope


def test_a_primary_starting_folds_what_was_left_hot_into_its_dirty_log(tmp_path: Path) -> None:
    al, al_path, dirty_path = _logs(tmp_path)
    for rec in (
        _w(b"db", AL_EXTENT, 1),
        Record(0, Op.TRUNCATE, b"t", offset=9),
        Record(0, Op.MKDIR, b"newdir"),
        Record(0, Op.SETATTR, b"m"),
    ):
        al.sync(al.note(rec, acked=0))
    al.close()
    al = ActivityLog(al_path)
    al.open()
    d = DirtyLog(dirty_path)
    d.open()
    assert al.fold_into(d)
    assert not al.state.hot and al_path.stat().st_size == 0
    d.close()
    d = DirtyLog(dirty_path)  # durable: read back
    d.open()
    assert list(d.state.ranges[b"db"]) == [(AL_EXTENT, 2 * AL_EXTENT)]
    assert list(d.state.ranges[b"t"]) == [(9, INF)]
    assert d.state.scope == {b"newdir"}
    assert b"m" in d.state.touched
    assert not d.state.lost
    d.close()
    assert not al.fold_into(DirtyLog(tmp_path / "other"))  # nothing left: nothing to do
    al.close()


def test_merge_adds_the_peer_plan_to_ours(tmp_path: Path) -> None:
    d = DirtyLog(tmp_path / "dirty")
    d.open()
    d.note(_w(b"a", 0, 10))
    d.note(Record(0, Op.RENAME, b"old", path2=b"new"))
    ours = d.snapshot()
    d.close()
    peer, _ = plan_from_wire(
        {"state": "intact", "ranges": [["a", 100, 200], ["b", 0, -1]], "touched": ["m"],
         "scope": ["s"]},
        valid_path,
    )  # fmt: skip
    assert peer is not None
    merge_peer(ours, peer)
    # its extents say where its copy may differ, not that it does: a checksum delta of
    # those files (scope), which covers our own ranges in them too
    assert {b"a", b"b", b"s"} <= ours.scope
    assert list(ours.ranges[b"a"]) == [(0, 10)] and b"b" not in ours.ranges
    assert b"m" in ours.touched  # metadata only: reconciled as a path


def test_trim_drops_what_was_acknowledged_and_idle_from_the_file(tmp_path: Path) -> None:
    """A crash must leave recent activity hot, not every entry since the log began (a file
    written once long ago would travel whole on every return)."""
    al, al_path, dirty_path = _logs(tmp_path)
    old, busy, unacked = _w(b"old", 0, 1), _w(b"busy", 0, 1), _w(b"late", 0, 1)
    for seq, rec in enumerate((old, busy, unacked), start=1):
        al.sync(al.note(rec, acked=0))
        al.release(rec, seq)
    assert al.trim(acked=2, idle=3600) == 0  # nothing idle yet
    time.sleep(0.05)
    al.note(busy, acked=0)  # in use again: not idle
    al.release(busy, 4)
    assert al.trim(acked=2, idle=0.04) == 1  # "old" only: "late" (seq 3) is not acknowledged
    os.close(al._fd)  # crash
    plan, why = load_activity(al_path, dirty_path)
    assert plan is not None, why
    assert set(plan.ranges) == {b"busy", b"late"}


def test_a_full_disk_fails_the_operation_and_never_fakes_an_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lab's fault campaign filled a primary's disk: recording a new entry must then fail
    the operation (ENOSPC to the application), leave no entry that looks recorded, no torn
    frame that would hide later records, and a failed trim must leave the file whole."""
    al, al_path, dirty_path = _logs(tmp_path)
    al.sync(al.note(_w(b"db", 0, 1), acked=0))
    al.release(_w(b"db", 0, 1), 1)
    real_write = os.write
    full = [True]

    def write(fd: int, data: bytes) -> int:
        if full[0]:
            return real_write(fd, data[: len(data) // 2])  # a short write, then full
        return real_write(fd, data)

    monkeypatch.setattr(recordlog.os, "write", write)
    size = al_path.stat().st_size
    with pytest.raises(OSError):
        al.note(Record(0, Op.RENAME, b"a", path2=b"b"), acked=0)
    assert set(al.state.hot) == {(b"db", 0)}  # nothing new looks recorded
    assert al_path.stat().st_size == size  # the half frame is gone
    with pytest.raises(OSError):
        al.compact()  # what a trim does
    assert not al_path.with_suffix(".compact").exists()  # its space given back
    assert al_path.stat().st_size == size  # the log itself untouched
    full[0] = False  # space again: the same operation records and later ones survive
    al.sync(al.note(Record(0, Op.RENAME, b"a", path2=b"b"), acked=0))
    os.close(al._fd)  # crash
    plan, why = load_activity(al_path, dirty_path)
    assert plan is not None, why
    assert plan.scope == {b"a", b"b"}
