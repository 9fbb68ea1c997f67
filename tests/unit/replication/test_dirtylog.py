"""Dirty log: coalescing, durability across a crash, torn tails, compaction, renames."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.replication.dirtylog import APPEND_EXTENT, INF, DirtyLog, RangeSet
from ha_runtime.replication.journal import Op, Record


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 50)), max_size=30))
def test_rangeset_is_the_union(ivs: list[tuple[int, int]]) -> None:
    rs = RangeSet()
    ref: set[int] = set()
    for a, n in ivs:
        rs.add(a, a + n)
        ref.update(range(a, a + n))
    got = {i for s, e in rs for i in range(s, e)}
    assert got == ref
    pairs = list(rs)
    assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(pairs))
    for a, n in ivs:
        assert rs.covers(a, a + n)


def _w(path: bytes, off: int, n: int) -> Record:
    return Record(0, Op.WRITE, path, offset=off, data=b"x" * n)


def test_rewrite_of_a_dirty_range_costs_nothing(tmp_path: Path) -> None:
    log = DirtyLog(tmp_path / "d")
    log.open()
    assert log.note(_w(b"db", 0, 4096)) > 0
    log.sync()
    size = log.size
    assert log.note(_w(b"db", 100, 200)) == 0  # covered
    assert log.size == size
    assert log.note(_w(b"db", 4096, 10)) > 0  # adjacent: coalesced in memory
    assert list(log.state.ranges[b"db"]) == [(0, 4106)]
    log.close()


def test_survives_a_crash_and_drops_a_torn_tail(tmp_path: Path) -> None:
    p = tmp_path / "d"
    log = DirtyLog(p)
    log.open()
    log.note(_w(b"a", 0, 10))
    log.note(Record(0, Op.TRUNCATE, b"a", offset=5))
    log.note(Record(0, Op.CREATE, b"dir/new"))
    log.note(Record(0, Op.RENAME, b"dir", path2=b"dir2"))
    log.note(_w(b"b", 50, 50))
    log.sync()
    os.close(log._fd)  # crash: no orderly close
    good = p.stat().st_size
    with open(p, "ab") as f:
        f.write(b"HJ\x01\x01\x00\x00\x00\x40partial")  # torn last record
    log2 = DirtyLog(p)
    log2.open()
    st = log2.state
    assert list(st.ranges[b"a"]) == [(0, INF)]
    assert list(st.ranges[b"b"]) == [(50, 100)]
    assert st.renames == [(b"dir", b"dir2")]
    assert {b"a", b"dir/new", b"dir", b"dir2"} <= st.touched
    assert not st.lost
    assert p.stat().st_size == good
    assert log2.rejected == {"truncated": 1}
    log2.close()


def test_corruption_in_the_middle_means_lost(tmp_path: Path) -> None:
    p = tmp_path / "d"
    log = DirtyLog(p)
    log.open()
    for i in range(2000):
        log.note(_w(b"f%d" % i, 0, 1))
    log.sync()
    log.close()
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(data)
    log2 = DirtyLog(p)
    log2.open()
    assert log2.state.lost
    log2.close()


def test_renames_move_ranges(tmp_path: Path) -> None:
    log = DirtyLog(tmp_path / "d")
    log.open()
    log.note(_w(b"d/x", 0, 10))
    log.note(_w(b"dx", 0, 10))
    log.note(Record(0, Op.RENAME, b"d", path2=b"e"))
    assert set(log.state.ranges) == {b"e/x", b"dx"}
    log.close()


def test_compaction_keeps_the_state(tmp_path: Path) -> None:
    p = tmp_path / "d"
    log = DirtyLog(p, compact_bytes=20_000)
    log.open()
    rnd = random.Random(3)
    for _ in range(3000):
        log.note(_w(b"f%d" % rnd.randrange(5), rnd.randrange(20_000), rnd.randrange(1, 100)))
        log.sync()
    before = {k: list(v) for k, v in log.state.ranges.items()}
    assert p.stat().st_size < 3000 * 100 // 2  # compacted at least once
    log.close()
    log2 = DirtyLog(p)
    log2.open()
    assert {k: list(v) for k, v in log2.state.ranges.items()} == before
    log2.clear()
    log2.close()
    log3 = DirtyLog(p)
    log3.open()
    assert log3.state.empty
    log3.close()


def test_appends_are_recorded_ahead_so_a_stream_costs_one_record_per_extent(
    tmp_path: Path,
) -> None:
    log = DirtyLog(tmp_path / "d.log")
    log.open()
    block = b"x" * 8192
    positions = []
    size = 0
    for _ in range(2 * APPEND_EXTENT // len(block)):
        rec = Record(0, Op.WRITE, b"f", offset=size, data=block)
        pos = log.note(rec, eof=lambda: size)  # noqa: B023 (called at once)
        positions.append(pos)
        log.sync(pos)  # as the sink does before performing the write
        size += len(block)
    # one new log position (one fsync) per extent crossed, not one per write
    assert len([p for p in positions if p]) == 2
    assert list(log.state.ranges[b"f"]) == [(0, 2 * APPEND_EXTENT)]
    # an overwrite inside the file is recorded exactly
    assert log.note(Record(0, Op.WRITE, b"g", offset=0, data=block), eof=lambda: 1 << 30)
    assert list(log.state.ranges[b"g"]) == [(0, len(block))]
    log.close()


def test_a_covered_write_waits_for_its_record_to_be_durable(tmp_path: Path) -> None:
    """Two operations on one range: the second is covered by the first one's record, which
    may still be on its way to disk (the first is waiting for the fsync); the second must
    not be performed before it is durable either."""
    log = DirtyLog(tmp_path / "d")
    log.open()
    first = log.note(_w(b"db", 0, 4096))
    assert first > 0
    second = log.note(_w(b"db", 0, 100))  # covered, but nothing is durable yet
    assert second >= first
    log.sync(first)
    assert log.note(_w(b"db", 0, 100)) == 0  # covered and durable: free
    log.close()
