"""Dirty-range log after a torn write or with a damaged tail.

test_dirtylog.py covers one hand-written torn record and a flipped byte in a large log;
here: a crash cut at *every* byte position of the last record, arbitrary garbage tails,
and arbitrary (also nonsensical) record sequences read back from disk.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.replication.dirtylog import DirtyLog, DirtyState
from ha_runtime.replication.journal import Op, Record, read_records, record_frame
from ha_runtime.replication.recordlog import TORN_MAX

SETTINGS = settings(max_examples=60, deadline=None)

paths = st.sampled_from([b"a", b"a/b", b"a/b/c", b"d", b"dx"])
ops = st.one_of(
    st.builds(
        lambda p, o, n: Record(0, Op.WRITE, p, offset=o, length=n),
        paths,
        st.integers(0, 1000),
        st.integers(1, 100),
    ),
    st.builds(lambda p, o: Record(0, Op.TRUNCATE, p, offset=o), paths, st.integers(0, 1000)),
    st.builds(lambda p: Record(0, Op.CREATE, p), paths),
    st.builds(lambda p: Record(0, Op.UNLINK, p), paths),
    # any pair, including onto itself and into its own subtree (the kernel refuses those,
    # but a log file read back must not be trusted to be sensible)
    st.builds(lambda p, q: Record(0, Op.RENAME, p, path2=q), paths, paths),
    st.builds(lambda p, q: Record(0, Op.LINK, p, path2=q), paths, paths),
)


def _state(recs: list[Record]) -> DirtyState:
    s = DirtyState()
    for r in recs:
        s.apply(r)
    return s


def _frozen(s: DirtyState) -> object:
    return ({k: list(v) for k, v in s.ranges.items()}, s.touched, s.renames, s.lost)


@settings(max_examples=12, deadline=None)  # each example opens the log ~80 times (fsyncs)
@given(recs=st.lists(ops, min_size=1, max_size=8))
def test_torn_last_record_at_every_position(recs: list[Record]) -> None:
    frames = [record_frame(r) for r in recs]
    head = b"".join(frames[:-1])
    expected = _frozen(_state(recs[:-1]))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "dirty"
        for cut in range(len(frames[-1])):  # every strict prefix of the last record
            p.write_bytes(head + frames[-1][:cut])
            log = DirtyLog(p)
            log.open()
            try:
                assert _frozen(log.state) == expected  # nothing partial applied
                assert sum(log.rejected.values()) == (1 if cut else 0)
                assert p.stat().st_size == len(head)  # the tear is cut off durably
                assert log.size == len(head)
            finally:
                log.close()
        # and the log appends cleanly after the repair
        log = DirtyLog(p)
        log.open()
        log.note(Record(0, Op.CREATE, b"new"))
        log.sync()
        log.close()
        got, good, rejected = read_records(p.read_bytes())
        assert good == p.stat().st_size and not rejected
        assert _frozen(_state(got)) == _frozen(_state([*recs[:-1], Record(0, Op.CREATE, b"new")]))


@SETTINGS
@given(
    recs=st.lists(ops, max_size=6),
    garbage=st.binary(min_size=1, max_size=200) | st.just(b"\0" * 4096),
)
def test_garbage_tail_is_dropped_and_counted(recs: list[Record], garbage: bytes) -> None:
    head = b"".join(record_frame(r) for r in recs)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "dirty"
        p.write_bytes(head + garbage)
        log = DirtyLog(p)
        log.open()
        try:
            assert _frozen(log.state) == _frozen(_state(recs))
            assert sum(log.rejected.values()) == 1
            assert p.stat().st_size == len(head)
        finally:
            log.close()


def test_large_corrupt_tail_marks_the_log_lost() -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "dirty"
        p.write_bytes(record_frame(Record(0, Op.CREATE, b"a")) + os.urandom(TORN_MAX + 1))
        log = DirtyLog(p)
        log.open()
        assert log.state.lost and sum(log.rejected.values()) == 1
        log.close()
        log = DirtyLog(p)  # and it stays lost after a restart
        log.open()
        assert log.state.lost and not log.rejected
        log.close()


@SETTINGS
@given(recs=st.lists(ops, max_size=20))
def test_any_record_sequence_survives_note_compact_and_reload(recs: list[Record]) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "dirty"
        log = DirtyLog(p)
        log.open()
        for r in recs:
            log.note(r)
        log.sync()
        before = _frozen(log.state)
        log.close()
        log = DirtyLog(p)
        log.open()
        assert _frozen(log.state) == before
        log.compact()
        log.close()
        log = DirtyLog(p)
        log.open()
        # compaction keeps what is dirty (renames are kept as such, ranges re-keyed)
        assert {k: list(v) for k, v in log.state.ranges.items()} == before[0]  # type: ignore[index]
        log.close()


def test_rename_into_own_subtree_regression() -> None:
    """A RENAME of a path onto itself or into its own subtree raised KeyError in
    DirtyState.apply (the ranges under the target had already been removed)."""
    for src, dst in ((b"a", b"a/b"), (b"a", b"a"), (b"a/b", b"a/b")):
        s = DirtyState()
        s.apply(Record(0, Op.WRITE, b"a/b", length=3))
        s.apply(Record(0, Op.RENAME, src, path2=dst))
        assert s.touched >= {src, dst}
