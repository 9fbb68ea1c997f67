"""rsync algorithm: patch(basis, delta(signature(basis), new)) == new, and only changes travel."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.replication import delta as D

small_blocks = st.sampled_from([1, 2, 3, 7, 16, 64])


@settings(max_examples=300, deadline=None)
@given(basis=st.binary(max_size=600), new=st.binary(max_size=600), bs=small_blocks)
def test_roundtrip_arbitrary(basis: bytes, new: bytes, bs: int) -> None:
    sig = D.signature(basis, bs)
    d = D.delta(sig, new)
    assert D.patch(basis, d) == new
    # and through the wire formats
    sig2 = D.Signature.decode(sig.encode())
    d2 = D.Delta.decode(D.delta(sig2, new).encode())
    assert D.patch(basis, d2) == new


@settings(max_examples=200, deadline=None)
@given(
    basis=st.binary(max_size=3000),
    new=st.binary(max_size=6000),
    bs=small_blocks,
    limit=st.integers(1024, 4096),
    out_limit=st.integers(1, 5000),
)
def test_split_pieces_rebuild_the_file_within_the_limits(
    basis: bytes, new: bytes, bs: int, limit: int, out_limit: int
) -> None:
    d = D.delta(D.signature(basis, bs), new)
    pieces = list(D.split(d, limit, out_limit))
    assert all(len(p.encode()) <= limit for p in pieces)
    assert all(p.length <= out_limit for p in pieces)
    assert sum(p.length for p in pieces) == len(new)
    rebuilt = b"".join(D.patch(basis, D.Delta.decode(p.encode())) for p in pieces)
    assert rebuilt == new


@settings(max_examples=150, deadline=None)
@given(
    basis=st.binary(min_size=1, max_size=2000),
    edits=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 40), st.binary(max_size=40)),
        max_size=6,
    ),
    bs=st.sampled_from([4, 16, 32]),
)
def test_roundtrip_edited(basis: bytes, edits: list[tuple[int, int, bytes]], bs: int) -> None:
    """Insertions, deletions and replacements: the realistic shapes of a changed file."""
    new = bytearray(basis)
    for pos, cut, ins in edits:
        p = pos % (len(new) + 1)
        new[p : p + cut] = ins
    sig = D.signature(basis, bs)
    d = D.delta(sig, bytes(new))
    assert D.patch(basis, d) == bytes(new)
    # the sender's own block hashes, computed beforehand, change nothing in the result
    ours = D.block_hashes(bytes(new), bs, len(basis))
    assert D.delta(sig, bytes(new), ours).encode() == d.encode()


def _patched_in_place(basis: bytes, pieces: list[D.Delta]) -> bytes:
    """The basis in a file, each piece patched over it where its output begins, then the
    file cut to the delta's length (what the secondary's applier does)."""
    with tempfile.TemporaryFile() as f:
        f.write(basis)
        f.flush()
        fd = f.fileno()
        end = 0
        for p in pieces:
            end = D.patch_in_place(fd, D.Delta.decode(p.encode()), end)
        os.ftruncate(fd, end)
        f.seek(0)
        return f.read()


@settings(max_examples=150, deadline=None)
@given(
    basis=st.binary(min_size=1, max_size=3000),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=80)), max_size=6),
    resize=st.integers(-500, 500),
    bs=st.sampled_from([4, 16, 32]),
    limit=st.integers(1024, 2048),
)
def test_data_changed_in_place_is_patched_in_place(
    basis: bytes, edits: list[tuple[int, bytes]], resize: int, bs: int, limit: int
) -> None:
    """Overwrites, then an append or a truncation: when the delta says in place (repetitive
    data may match elsewhere: then it does not), writing its literals over the old file
    rebuilds the new one, piece by piece."""
    new = bytearray(basis)
    for pos, data in edits:
        p = pos % len(new)
        new[p : p + len(data)] = data[: len(new) - p]
    new = new + os.urandom(resize) if resize > 0 else new[: max(0, len(new) + resize)]
    d = D.delta(D.signature(basis, bs), bytes(new))
    pieces = list(D.split(d, limit))
    if D.in_place(d):
        assert _patched_in_place(basis, pieces) == bytes(new)
    else:
        with pytest.raises(D.DeltaError):
            _patched_in_place(basis, pieces)


def test_scattered_changes_are_in_place_and_shifted_data_is_not() -> None:
    basis = os.urandom(256 * 1024)
    new = bytearray(basis)
    for off in (5000, 70_000, 200_000):
        new[off : off + 100] = os.urandom(100)
    d = D.delta(D.signature(basis, 1024), bytes(new) + b"appended")
    assert D.in_place(d)
    assert _patched_in_place(basis, list(D.split(d, 4096))) == bytes(new) + b"appended"
    shifted = D.delta(D.signature(basis, 1024), b"inserted" + basis)
    assert not D.in_place(shifted)
    # refused before anything is written: the file is left as it was
    with tempfile.TemporaryFile() as f:
        f.write(basis)
        f.flush()
        with pytest.raises(D.DeltaError):
            D.patch_in_place(f.fileno(), shifted)
        f.seek(0)
        assert f.read() == basis


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), nchanges=st.integers(0, 8))
def test_only_mismatching_blocks_travel(seed: int, nchanges: int) -> None:
    rnd = random.Random(seed)
    bs = 256
    basis = rnd.randbytes(bs * 64 + rnd.randrange(bs))
    new = bytearray(basis)
    touched: set[int] = set()
    for _ in range(nchanges):
        p = rnd.randrange(len(new))
        new[p] ^= 0xFF
        touched.add(p // bs)
    d = D.delta(D.signature(basis, bs), bytes(new))
    assert D.patch(basis, d) == bytes(new)
    # Each changed byte costs at most its block; unchanged blocks never travel.
    assert d.literal_bytes <= len(touched) * bs
    assert len(d.encode()) <= d.literal_bytes + 17 * (2 * len(touched) + 1) + 16


def test_blocks_changed_in_place_need_no_rolling_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scattered in-place changes (the full resync's usual case) are settled block by
    block: the rolling search, 6 ms a window, never runs, and only changed blocks travel."""
    searches: list[int] = []
    real = D._next_match
    monkeypatch.setattr(D, "_next_match", lambda *a: searches.append(a[2]) or real(*a))
    rnd = random.Random(7)
    bs = 1024
    basis = rnd.randbytes(bs * 200)
    new = bytearray(basis)
    touched = set(rnd.sample(range(200), 20)) | {0, 1}  # the very first ones too
    for b in touched:
        new[b * bs + rnd.randrange(bs)] ^= 0x5A
    d = D.delta(D.signature(basis, bs), bytes(new))
    assert D.patch(basis, d) == bytes(new)
    assert d.literal_bytes == len(touched) * bs
    # Two changed blocks in a row: the search finds what follows them; nothing else needs it.
    assert len(searches) <= sum(1 for b in touched if b + 1 in touched)


def test_runs_of_blocks_changed_in_place_need_no_rolling_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Up to IN_PLACE_AHEAD consecutive changed blocks are settled by the known hashes of the
    blocks after them (two in a row cost a search each: 0.74 s of the 1 GiB / 1 % delta)."""
    searches: list[int] = []
    real = D._next_match
    monkeypatch.setattr(D, "_next_match", lambda *a: searches.append(a[2]) or real(*a))
    rnd = random.Random(9)
    bs = 1024
    basis = rnd.randbytes(bs * 300)
    new = bytearray(basis)
    touched: set[int] = set()
    for start in (3, 40, 41 + 20, 150, 290):  # runs of 1 to 4 changed blocks
        for b in range(start, min(300, start + rnd.randint(1, D.IN_PLACE_AHEAD))):
            touched.add(b)
            new[b * bs + rnd.randrange(bs)] ^= 0x5A
    sig = D.signature(basis, bs)
    d = D.delta(sig, bytes(new), D.block_hashes(bytes(new), bs))
    assert D.patch(basis, d) == bytes(new)
    assert D.in_place(d)
    assert d.literal_bytes == len(touched) * bs
    assert searches == []


@pytest.mark.parametrize("bs", [2048, 4096, 32768, 131072, 3000])
def test_weak_checksums_from_rows_are_exact(bs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 row products give the very values of the float64 ones and of the rolling
    checksum at aligned offsets, bytes at their largest included."""
    rnd = random.Random(bs)
    data = bytearray(rnd.randbytes(bs * 9 + 17))
    data[bs : 2 * bs] = b"\xff" * bs  # the largest sums
    x = D._as_u8(bytes(data))
    monkeypatch.setattr(D, "_BLAS_SERIAL", True)
    rows = D._block_weak(x, bs)
    monkeypatch.setattr(D, "_BLAS_SERIAL", False)
    plain = D._block_weak(x, bs)
    rolling = D._rolling_weak(x, bs)
    assert rows.tolist() == plain.tolist() == [int(rolling[i * bs]) for i in range(9)]


def test_block_hashes_given_leave_only_unaligned_offsets_to_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The primary hashes its blocks while the secondary computes the signature: a delta of
    data changed in place then hashes nothing itself."""
    rnd = random.Random(8)
    bs = 1024
    basis = rnd.randbytes(bs * 100)
    new = bytearray(basis)
    for b in rnd.sample(range(100), 10):
        new[b * bs + 5] ^= 0x5A
    sig = D.signature(basis, bs)
    ours = D.block_hashes(bytes(new), bs)
    hashed: list[int] = []
    real = D.strong_hash
    monkeypatch.setattr(D, "strong_hash", lambda data: hashed.append(len(data)) or real(data))
    d = D.delta(sig, bytes(new), ours)
    assert D.patch(basis, d) == bytes(new)
    assert D.in_place(d)
    # without ``ours`` it hashes every block (over 100); with it, at most a rolling search's
    # candidates after two changed blocks in a row
    assert len(hashed) <= 10


def test_shifted_data_is_found_by_the_rolling_checksum() -> None:
    basis = os.urandom(64 * 1024)
    new = b"inserted!" + basis[:30000] + b"x" * 5 + basis[30000:]
    d = D.delta(D.signature(basis, 1024), new)
    assert D.patch(basis, d) == new
    assert d.literal_bytes <= 9 + 5 + 2 * 1024


def test_repetitive_data_and_empty_edges() -> None:
    for basis, new in [(b"", b""), (b"", b"abc"), (b"abc", b""), (b"\0" * 10000, b"\0" * 10001)]:
        d = D.delta(D.signature(basis, 64), new)
        assert D.patch(basis, d) == new
    d = D.delta(D.signature(b"\0" * 65536, 4096), b"\0" * 65536)
    assert d.literal_bytes == 0


def test_decoders_reject_garbage() -> None:
    sig = D.signature(os.urandom(5000), 1024).encode()
    for bad in (sig[:-1], sig + b"x", b"junk", b"HSG1" + sig[4:10]):
        with pytest.raises(D.DeltaError):
            D.Signature.decode(bad)
    dl = D.delta(D.signature(b"a" * 100, 16), b"b" * 100).encode()
    for bad in (dl[:-1], dl + b"x", b"HDL1" + b"\xff" * 20):
        with pytest.raises(D.DeltaError):
            D.Delta.decode(bad)


def test_files_and_a_large_buffer_fast(tmp_path: Path) -> None:
    rnd = random.Random(7)
    basis = rnd.randbytes(8 << 20)
    new = bytearray(basis)
    for _ in range(20):
        p = rnd.randrange(len(new) - 4096)
        new[p : p + 4096] = rnd.randbytes(4096)
    (tmp_path / "old").write_bytes(basis)
    (tmp_path / "new").write_bytes(new)
    sig = D.signature_file(tmp_path / "old")
    d = D.delta_file(sig, tmp_path / "new")
    D.patch_file(tmp_path / "old", d, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == bytes(new)
    assert d.literal_bytes <= 40 * sig.block_size
