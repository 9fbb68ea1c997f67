"""Owner ids travel as unsigned 32-bit values: every id the kernel gives (up to
0xFFFFFFFE), with 0xFFFFFFFF as "unchanged" (-1 in a Record, as chown(2) takes it)."""

from __future__ import annotations

import pytest

from ha_runtime.replication.journal import (
    FrameDecoder,
    Op,
    Record,
    RecordError,
    decode_record,
    record_frame,
)


@pytest.mark.parametrize("uid", [0, 1000, (1 << 31) - 1, 1 << 31, 3_000_000_000, 0xFFFFFFFE])
def test_every_id_packs_and_decodes_unchanged(uid: int) -> None:
    """uids >= 2**31 did not pack ('i'): the primary performed the operation, then the
    record raised struct.error and was neither replicated nor noted."""
    rec = Record(7, Op.CREATE, b"f", mode=0o100600, uid=uid, gid=uid)
    frames = FrameDecoder().feed(record_frame(rec))
    assert len(frames) == 1
    back = decode_record(frames[0].payload)
    assert (back.uid, back.gid) == (uid, uid)


def test_unchanged_is_minus_one_in_a_record_and_all_ones_on_the_wire() -> None:
    rec = Record(1, Op.SETATTR, b"f", uid=-1, gid=-1)
    enc = rec.encode()
    assert enc.count(b"\xff\xff\xff\xff") >= 2  # the same bytes as the signed encoding
    back = decode_record(enc)
    assert (back.uid, back.gid) == (-1, -1)
    assert decode_record(Record(1, Op.SETATTR, b"f", uid=0xFFFFFFFF).encode()).uid == -1


@pytest.mark.parametrize("uid", [-2, 1 << 32])
def test_an_id_out_of_range_does_not_encode_as_another(uid: int) -> None:
    with pytest.raises((RecordError, ValueError)):
        Record(1, Op.CREATE, b"f", uid=uid).encode()
