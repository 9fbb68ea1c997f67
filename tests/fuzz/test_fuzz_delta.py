"""rsync signature and delta wire formats from the peer: strict decoding, never a crash,
and a decoded delta never patches outside its basis.

test_delta.py checks a few hand-made bad encodings; here arbitrary bytes, every truncation,
bit flips and lying counts/lengths of valid encodings.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.replication import delta as D

SETTINGS = settings(max_examples=150, deadline=None)


def _decode_sig(b: bytes) -> D.Signature | None:
    try:
        return D.Signature.decode(b)
    except D.DeltaError:
        return None


def _decode_delta(b: bytes) -> D.Delta | None:
    try:
        return D.Delta.decode(b)
    except D.DeltaError:
        return None


@SETTINGS
@given(garbage=st.binary(max_size=300))
def test_arbitrary_bytes_are_rejected_with_delta_error(garbage: bytes) -> None:
    for magic in (b"", b"HSG1", b"HDL1"):
        s = _decode_sig(magic + garbage)
        if s is not None:
            assert s.encode() == magic + garbage
        d = _decode_delta(magic + garbage)
        if d is not None:
            assert d.encode() == magic + garbage


@SETTINGS
@given(basis=st.binary(max_size=400), new=st.binary(max_size=400), data=st.data())
def test_mutated_encodings_decode_strictly(basis: bytes, new: bytes, data: st.DataObject) -> None:
    sig = D.signature(basis, data.draw(st.sampled_from([1, 3, 16, 64])))
    d = D.delta(sig, new)
    for enc, dec in ((sig.encode(), _decode_sig), (d.encode(), _decode_delta)):
        for cut in range(len(enc)):
            assert dec(enc[:cut]) is None  # no prefix is a valid encoding
        assert dec(enc + data.draw(st.binary(min_size=1, max_size=9))) is None
        bad = bytearray(enc)
        bad[data.draw(st.integers(0, len(enc) - 1))] ^= data.draw(st.integers(1, 255))
        got = dec(bytes(bad))
        if got is not None:  # a flip inside hashes or literal data stays a valid encoding
            assert got.encode() == bytes(bad)


@SETTINGS
@given(
    basis=st.binary(max_size=200),
    length=st.integers(0, 2**64 - 1),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just(D.COPY), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
            st.tuples(st.just(D.COPY), st.integers(0, 250), st.integers(0, 250)),
            st.tuples(st.just(D.LITERAL), st.binary(max_size=20)),
        ),
        max_size=6,
    ),
    nops_lie=st.integers(-2, 2),
)
def test_lying_deltas_never_patch_outside_the_basis(
    basis: bytes, length: int, ops: list[tuple[int, int, int] | tuple[int, bytes]], nops_lie: int
) -> None:
    dl = D.Delta(length, list(ops))
    enc = bytearray(dl.encode())
    struct.pack_into("!I", enc, 12, max(0, len(ops) + nops_lie))
    got = _decode_delta(bytes(enc))
    if got is None:
        return
    assert nops_lie == 0 or not ops  # a wrong op count cannot line up with the bytes
    try:
        out = D.patch(basis, got)
    except D.DeltaError:
        return
    assert len(out) == length
    for op in got.ops:
        if op[0] == D.COPY and len(op) == 3:
            assert op[1] + op[2] <= len(basis)


@SETTINGS
@given(
    bs=st.integers(0, 2**32 - 1),
    length=st.integers(0, 2**64 - 1),
    nb=st.integers(0, 2**64 - 1),
    tl=st.sampled_from([0, 16, 255]),
    body=st.binary(max_size=100),
)
def test_signature_header_lies(bs: int, length: int, nb: int, tl: int, body: bytes) -> None:
    enc = struct.pack("!4sIQQB", b"HSG1", bs, length, nb, tl) + body
    s = _decode_sig(enc)
    if s is not None:
        assert s.nblocks == nb and s.length == length and s.encode() == enc
