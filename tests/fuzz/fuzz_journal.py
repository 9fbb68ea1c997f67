"""Coverage-guided fuzzing of the journal frame decoder and the record decoder:
`python tests/fuzz/fuzz_journal.py -runs=N`."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["ha_runtime"]):
    from ha_runtime.replication import journal as J
    from ha_runtime.replication.link.framing import decode_control

KEY = J.derive_key(b"k" * 48)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    split = fdp.ConsumeIntInRange(0, 64)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    # 1. the raw stream, fed in two pieces: only authenticated frames come out
    dec = J.FrameDecoder(KEY)
    frames = dec.feed(raw[:split]) + dec.feed(raw[split:])
    dec.finish()
    assert not frames or dec.consumed > 0
    assert (dec.failed is None) == (sum(dec.rejected.values()) == 0)
    # 2. the same bytes as an authenticated payload of every kind: strict parsing, no raise
    f = J.Frame(J.Kind.RECORD, raw)
    try:
        rec = J.decode_record(raw)
    except J.RecordError:
        pass
    else:
        assert rec.encode() == raw
    assert f.json() is None or isinstance(f.json(), dict)
    J.Frame(J.Kind.ACK, raw).ack()
    decode_control(J.Frame(J.Kind.CONTROL, raw))
    (g,) = J.FrameDecoder(KEY).feed(J.encode_frame(J.Kind.RECORD, raw, KEY))
    assert g.payload == raw


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
