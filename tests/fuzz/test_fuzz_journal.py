"""Journal frames and records from a hostile stream or a damaged file.

test_journal.py proves the round trip, single bit flips of one frame and the named reasons;
here: truncation of a multi-frame stream at every position, length fields that lie under a
valid tag (an attacker with the key, or a buggy peer), and arbitrary authenticated payloads
(strict decoding: either a RecordError or a record that re-encodes to the same bytes).
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.replication import journal as J
from ha_runtime.replication.link.framing import decode_control, encode_control

KEY = J.derive_key(b"k" * 48)
SETTINGS = settings(max_examples=150, deadline=None)

names = st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\0" not in b)
paths = st.lists(names.filter(lambda b: b not in (b".", b"..")), min_size=1, max_size=3).map(
    b"/".join
)
records = st.builds(
    J.Record,
    seq=st.integers(0, 2**64 - 1),
    op=st.sampled_from([J.Op.WRITE, J.Op.TRUNCATE, J.Op.CREATE, J.Op.UNLINK, J.Op.MKDIR]),
    path=paths,
    offset=st.integers(0, 2**40),
    data=st.binary(max_size=64),
)


def _retag(frame: bytes, header: bytes, payload: bytes) -> bytes:
    return header + payload + J._tag(KEY, header, payload)


@settings(max_examples=60, deadline=None)  # each example decodes every prefix
@given(recs=st.lists(records, min_size=1, max_size=4))
def test_stream_truncated_anywhere_yields_only_whole_frames(recs: list[J.Record]) -> None:
    frames = [J.record_frame(r, KEY) for r in recs]
    stream = b"".join(frames)
    ends = [sum(len(f) for f in frames[: i + 1]) for i in range(len(frames))]
    for cut in range(len(stream) + 1):
        dec = J.FrameDecoder(KEY)
        got = dec.feed(stream[:cut])
        dec.finish()
        complete = sum(1 for e in ends if e <= cut)
        assert [J.decode_record(f.payload) for f in got] == recs[:complete]
        whole = cut in (0, *ends)
        assert (dec.failed is None) == whole
        assert sum(dec.rejected.values()) == (0 if whole else 1)


@SETTINGS
@given(
    rec=records,
    lie=st.integers(0, 2**32 - 1),
    extra=st.binary(max_size=40),
)
def test_frame_length_lie_under_a_valid_tag(rec: J.Record, lie: int, extra: bytes) -> None:
    """A header claiming another payload length: the frame is cut elsewhere, so the tag
    cannot match, or the length is over the limit; a short stream waits (no frame, no hang)
    and is counted as truncated at the end."""
    payload = rec.encode()
    hdr = J.HEADER.pack(J.MAGIC, J.VERSION, int(J.Kind.RECORD), lie)
    stream = _retag(b"", hdr, payload) + extra
    dec = J.FrameDecoder(KEY)
    got = dec.feed(stream)
    dec.finish()
    if lie == len(payload):
        assert [J.decode_record(f.payload) for f in got] == [rec]
    else:
        assert got == []
        assert dec.failed in ("oversized", "bad_tag", "truncated")
        assert sum(dec.rejected.values()) == 1


piece = st.binary(max_size=12) | st.lists(st.sampled_from([b"a", b"/", b".", b"\0"])).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=200), data=st.data())
def test_authenticated_arbitrary_payload_is_strictly_decoded(
    payload: bytes, data: st.DataObject
) -> None:
    # Half the time, a real record header with random op/fields and consistent (or lying)
    # lengths: reaches the path and field checks behind the length check.
    if data.draw(st.booleans()):
        fields = list(J._REC.unpack_from(J.Record(1, J.Op.WRITE, b"a").encode()))
        fields[1] = data.draw(st.integers(0, 20))
        fields[3] = data.draw(st.sampled_from([0, 1 << 62, (1 << 62) + 1, 2**64 - 1]))
        parts = [data.draw(piece) for _ in range(4)]
        fields[11:15] = [len(x) for x in parts]
        fields[14] += data.draw(st.sampled_from([0, 0, 0, 1, -1])) if parts[3] else 0
        payload = J._REC.pack(*fields) + b"".join(parts)
    frame = J.encode_frame(J.Kind.RECORD, payload, KEY)
    (f,) = J.FrameDecoder(KEY).feed(frame)
    try:
        rec = J.decode_record(f.payload)
    except J.RecordError as e:
        assert str(e).startswith("record_")
    else:
        assert rec.encode() == payload  # nothing dropped or invented
        assert J.valid_path(rec.path, allow_empty=True)
        assert b".." not in rec.path.split(b"/")
        assert rec.offset <= 1 << 62


@SETTINGS
@given(payload=st.binary(max_size=100), kind=st.sampled_from(J.Kind))
def test_frame_accessors_never_raise(payload: bytes, kind: J.Kind) -> None:
    f = J.Frame(kind, payload)
    obj = f.json()
    assert obj is None or isinstance(obj, dict)
    a = f.ack()
    assert a is None or (kind == J.Kind.ACK and len(payload) == 16)
    c = decode_control(J.Frame(J.Kind.CONTROL, payload))
    assert c is None or isinstance(c[0], dict)


def test_deeply_nested_json_is_malformed_not_a_crash_regression() -> None:
    """json.loads raises RecursionError (not ValueError) on deep nesting: an authenticated
    peer's ERROR or CONTROL frame of "[[[[..." used to kill the link's task tree."""
    deep = b"[" * 200_000
    assert J.Frame(J.Kind.ERROR, deep).json() is None
    body = struct.pack("!I", len(deep)) + deep
    assert decode_control(J.Frame(J.Kind.CONTROL, body)) is None
    ok = encode_control({"op": "x", "id": 1}, b"body", KEY)
    (f,) = J.FrameDecoder(KEY).feed(ok)
    assert decode_control(f) == ({"op": "x", "id": 1}, b"body")


@SETTINGS
@given(recs=st.lists(records, min_size=1, max_size=5), garbage=st.binary(max_size=60))
def test_read_records_keeps_exactly_the_valid_prefix(recs: list[J.Record], garbage: bytes) -> None:
    blob = b"".join(J.record_frame(r) for r in recs)
    got, good, rejected = J.read_records(blob + garbage)
    if not garbage:
        assert (got, good, sum(rejected.values())) == (recs, len(blob), 0)
        return
    # garbage can only begin a valid frame by forging a checksum it was not made with
    assert got[: len(recs)] == recs
    assert good >= len(blob)
    if good == len(blob) + len(garbage):
        assert sum(rejected.values()) == 0
    else:
        assert sum(rejected.values()) == 1
