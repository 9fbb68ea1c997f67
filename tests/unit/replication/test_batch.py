"""BATCH records: a resync's small records in one, built by the primary (``batch.Builder``),
applied in order by the secondary's applier; a bad entry refuses the batch where it is."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from ha_runtime.config import ReplicationSettings
from ha_runtime.replication import batch
from ha_runtime.replication.journal import (
    SET_MODE,
    SET_MTIME,
    Op,
    Record,
    decode_record,
    record_frame,
)
from ha_runtime.replication.secondary.applier import Applier, RecordRefused
from ha_runtime.replication.service import ReplicationService
from tests.sitefactory import replication_cluster, replication_module

R = Record


def _batch(*recs: Record) -> Record:
    b = batch.Builder()
    for r in recs:
        b.add(r)
    return Record(7, Op.BATCH, b"", data=b.take())


def test_a_batch_applies_its_entries_in_order_and_travels_as_one_record(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"0123456789" * 30_000)
    b = batch.Builder()
    b.add(R(0, Op.MKDIR, b"d", mode=0o40750))
    b.add(R(0, Op.CREATE, b"d/f", mode=0o100640))
    b.add(R(0, Op.TRUNCATE, b"d/f", offset=300_000))
    fd = os.open(src, os.O_RDONLY)
    try:
        # read straight into the batch; past the end of the file: what there is
        assert b.read(fd, b"d/f", 0, 100_000) == 100_000
        assert b.read(fd, b"d/f", 250_000, 100_000) == 50_000
        assert b.read(fd, b"d/f", 400_000, 10) == 0  # nothing added
    finally:
        os.close(fd)
    b.add(R(0, Op.SETATTR, b"d/f", flags=SET_MODE | SET_MTIME, mode=0o600, mtime_ns=10**18))
    b.add(R(0, Op.CREATE, b"gone", mode=0o100600))
    b.add(R(0, Op.UNLINK, b"gone", flags=1))
    assert b.count == 8
    rec = Record(9, Op.BATCH, b"", data=b.take())
    assert b.count == 0 and b.size == 0
    # one frame on the wire, decoded strictly like any record (its path is empty)
    frame = record_frame(rec, tag=False)
    assert decode_record(frame[8:]).op == Op.BATCH

    peer = tmp_path / "peer"
    a = Applier(peer)
    a.apply(rec)
    a.barrier()
    a.close()
    want = src.read_bytes()
    got = (peer / "d/f").read_bytes()
    assert got[:100_000] == want[:100_000] and got[250_000:] == want[250_000:]
    assert got[100_000:250_000] == bytes(150_000)
    st = (peer / "d/f").stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_mtime_ns == 10**18
    assert not (peer / "gone").exists()
    assert a.applied_seq == a.durable_seq == 9


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(R(0, Op.WRITE, b"../escape", data=b"x"), id="unsafe-path"),
        pytest.param(R(0, Op.FSYNC, b"a"), id="barrier"),
        pytest.param(R(5, Op.WRITE, b"a", data=b"x"), id="numbered"),
        pytest.param(R(0, Op.RENAME, b"a", path2=b"b"), id="not-a-resync-op"),
    ],
)
def test_a_bad_entry_refuses_the_batch_where_it_is(tmp_path: Path, bad: Record) -> None:
    """Entries before the bad one are applied (as records before a refused one are), the bad
    one and what follows are not; the refusal names the entry."""
    b = batch.Builder()
    b.add(R(0, Op.CREATE, b"a", mode=0o100644))
    b.add(R(0, Op.WRITE, b"a", data=b"before"))
    # Builder.add refuses what may not be in a batch: forge the entry as a hostile peer would
    head = bad.head() + bad.data
    data = bytes(b.take()) + struct.pack("!I", len(head)) + head
    after = batch.Builder()
    after.add(R(0, Op.CREATE, b"after", mode=0o100644))
    data += bytes(after.take())
    a = Applier(tmp_path / "peer")
    with pytest.raises(RecordRefused, match="batch entry 2"):
        a.apply(Record(3, Op.BATCH, b"", data=data))
    a.close()
    assert (tmp_path / "peer/a").read_bytes() == b"before"
    assert not (tmp_path / "peer/after").exists()
    assert not (tmp_path / "escape").exists()
    assert a.applied_seq == 0


def test_a_malformed_batch_is_refused_not_misread(tmp_path: Path) -> None:
    whole = bytes(_batch(R(0, Op.CREATE, b"a", mode=0o100644)).data)
    a = Applier(tmp_path / "peer")
    for data, why in (
        (whole[:-3], "past the end"),  # cut inside the entry
        (whole + b"\0\0", "truncated length"),  # a length cut short
        (whole[:4] + b"\0" * (len(whole) - 4), "batch entry 0"),  # garbage in the entry
    ):
        with pytest.raises(RecordRefused, match=why):
            a.apply(Record(1, Op.BATCH, b"", data=data))
    a.close()
    with pytest.raises(ValueError, match="cannot travel in a batch"):
        batch.Builder().add(R(0, Op.FSYNC, b""))


def test_a_failing_entry_says_which_one(tmp_path: Path) -> None:
    a = Applier(tmp_path / "peer")
    rec = _batch(
        R(0, Op.CREATE, b"a", mode=0o100644),
        R(0, Op.WRITE, b"missing/dir/f", data=b"x"),  # its directory is not there
    )
    with pytest.raises(OSError, match=r"batch entry 1: WRITE b'missing/dir/f'"):
        a.apply(rec)
    a.close()
    assert (tmp_path / "peer/a").exists()


def test_the_secondary_offers_batches_in_its_hello_answer(tmp_path: Path) -> None:
    """The primary packs a resync's records only for a secondary that says it applies them
    (an older one refuses an unknown op and the resync would start over forever)."""
    cluster = replication_cluster(tmp_path, "node2", state_dir=tmp_path / "state")
    module = replication_module(tmp_path, cluster)
    settings = ReplicationSettings(backing_root=tmp_path / "replica", site_key=b"k" * 48)
    svc = ReplicationService(module, cluster, settings, on_event=lambda e: None)
    svc.backing.mkdir(parents=True)
    a = Applier(svc.backing)
    try:
        hello = {"op": "hello", "module": module.name, "node": "node1", "untagged": True}
        reply, _ = trio.run(svc.secondary.control, a, hello)
    finally:
        a.close()
    assert reply["batch"] is True
