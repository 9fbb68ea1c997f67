"""The rsync algorithm (block signatures, delta, patch), vectorised with numpy.

Same three steps as rsync/pyrsync2, not the same speed:

1. ``signature(basis)``: the receiver cuts its copy into blocks of ``block_size`` bytes and
   computes, for each, a weak checksum (Adler-style: ``a = sum x``, ``b = sum (B - j) x_j``,
   both mod 2**32, packed in 64 bits) and a strong hash (SHA-256 truncated to 128 bits:
   with SHA-NI it is about twice as fast as BLAKE2b on the servers we target).
2. ``delta(sig, new)``: the sender walks its file. Where the next block is one the receiver
   has (strong hash found in the signature), it emits a copy; otherwise it searches for the
   next offset where a receiver block starts. That search is the rolling checksum of rsync,
   computed for *every* offset of a window at once with the cumulative-sum identity
   ``a(k) = S1[k+B] - S1[k]``, ``b(k) = (k+B) a(k) - (S2[k+B] - S2[k])`` (``S1`` cumulative sum
   of the bytes, ``S2`` of ``i * x_i``; wrap-around arithmetic in uint32 is exact mod 2**32),
   then filtered through a bitmap of the receiver's weak checksums; only the few candidates
   that pass get a strong hash. No Python loop runs per byte: the loops run per block or per
   candidate.
3. ``patch(basis, delta)``: the receiver rebuilds the new file from copies of its blocks and
   the literal bytes; when every copy is in place (``in_place``: data changed where it lay,
   the common case), ``patch_in_place`` writes only the literals over the file itself.

Only blocks the receiver does not have travel (as literal bytes); the rest costs a few
bytes per run of consecutive blocks.

Long because: the rsync algorithm in one place (signature, delta, patch share a layout).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# One BLAS thread: the replicator's numpy work already runs in worker threads of its own,
# beside the other replica on a node of 2 vCPUs, and OpenBLAS's threads made each of the
# small products of ``_block_weak`` 3-5x slower there. Only effective before numpy loads.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_BLAS_SERIAL = os.environ.get("OPENBLAS_NUM_THREADS") == "1"

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

from ha_runtime.replication.beneath import open_file  # noqa: E402

STRONG_LEN = 16
MIN_BLOCK = 2048
MAX_BLOCK = 128 * 1024
_SIG_CHUNK = 8 << 20  # bytes of basis per vectorised signature step
_TABLE_BITS = 22
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
Buffer = bytes | bytearray | memoryview | mmap.mmap


class DeltaError(ValueError):
    """Malformed signature or delta (wire decoding) or a delta that does not fit its basis."""


def strong_hash(data: Buffer) -> bytes:
    return hashlib.sha256(data).digest()[:STRONG_LEN]


def block_size_for(length: int) -> int:
    """rsync's heuristic (about sqrt(length)), rounded to a power of two and clamped."""
    if length <= MIN_BLOCK * MIN_BLOCK:
        return MIN_BLOCK
    b = 1 << round(math.log2(math.sqrt(length)))
    return max(MIN_BLOCK, min(MAX_BLOCK, b))


def _as_u8(data: Buffer) -> U8:
    if isinstance(data, np.ndarray):
        return data
    if len(data) == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def _rolling_weak(x: U8, block: int, base: int = 0) -> U64:
    """Weak checksum of every window ``x[k:k+block]`` (k = 0 .. len(x)-block), vectorised.

    ``base`` is the absolute offset of ``x[0]``: the result does not depend on it (the
    identity cancels it) but using absolute indices keeps signature and delta consistent.
    """
    n = x.shape[0]
    if n < block:
        return np.zeros(0, dtype=np.uint64)
    xi = x.astype(np.uint32)
    s1 = np.empty(n + 1, dtype=np.uint32)
    s1[0] = 0
    np.cumsum(xi, dtype=np.uint32, out=s1[1:])
    idx = np.arange(base, base + n, dtype=np.uint32)  # wraps mod 2**32, harmless
    s2 = np.empty(n + 1, dtype=np.uint32)
    s2[0] = 0
    np.multiply(xi, idx, out=xi)
    np.cumsum(xi, dtype=np.uint32, out=s2[1:])
    m = n - block + 1
    a = s1[block:] - s1[:m]
    kb = np.arange(base + block, base + block + m, dtype=np.uint32)
    b = kb * a - (s2[block:] - s2[:m])
    out = b.astype(np.uint64)
    out <<= np.uint64(32)
    out |= a
    return np.asarray(out, dtype=np.uint64)


def _block_weak(x: U8, block: int) -> U64:
    """Weak checksum of each aligned full block of ``x`` (same values as ``_rolling_weak`` at
    offsets 0, B, 2B, ...): exact float products, in float32 over 256-byte rows when BLAS
    runs one thread (half the memory traffic: about 2x faster), else float64."""
    if _BLAS_SERIAL and block % _ROW == 0:
        return _block_weak_rows(x, block)
    nb = x.shape[0] // block
    out = np.empty(nb, dtype=np.uint64)
    w = (block - np.arange(block)).astype(np.float64)
    rows = max(1, (256 << 10) // block)  # float64 temporaries stay in cache
    c = x[: nb * block].reshape(nb, block)
    for s in range(0, nb, rows):
        cf = c[s : s + rows].astype(np.float64)
        a = cf.sum(axis=1).astype(np.uint64)
        b = (cf @ w).astype(np.uint64) & np.uint64(0xFFFFFFFF)
        out[s : s + rows] = (b << np.uint64(32)) | a
    return out


_ROW = 256


def _block_weak_rows(x: U8, block: int) -> U64:
    """``_block_weak`` from rows of 256 bytes: per row, the plain sum and the sum weighted by
    255 - i, exact in float32 (at most 255 * 256 * 255 / 2 < 2**24); per block, with R rows,
    a = sum a_r and b = sum ((B - 256 (r + 1) + 1) a_r + c_r), exact in float64 (< 2**53)."""
    nb = x.shape[0] // block
    out = np.empty(nb, dtype=np.uint64)
    r = block // _ROW
    i = np.arange(_ROW, dtype=np.float32)
    w = np.ascontiguousarray(np.stack([np.ones(_ROW, dtype=np.float32), _ROW - 1 - i], axis=1))
    coef = block - _ROW * (np.arange(r, dtype=np.float64) + 1) + 1
    step = max(1, (2 << 20) // block)  # blocks per product: float32 temporaries in cache
    rows = x[: nb * block].reshape(nb * r, _ROW)
    buf = np.empty((step * r, _ROW), dtype=np.float32)
    for s in range(0, nb, step):
        e = min(nb, s + step)
        cf = buf[: (e - s) * r]
        np.copyto(cf, rows[s * r : e * r], casting="unsafe")
        ac = (cf @ w).astype(np.float64).reshape(e - s, r, 2)
        a = ac[:, :, 0].sum(axis=1)
        b = ac[:, :, 0] @ coef + ac[:, :, 1].sum(axis=1)
        bi = b.astype(np.uint64) & np.uint64(0xFFFFFFFF)
        out[s:e] = (bi << np.uint64(32)) | a.astype(np.uint64)
    return out


def _table_index(weak: U64) -> npt.NDArray[np.intp]:
    with np.errstate(over="ignore"):
        h = weak * _GOLDEN
    return (h >> np.uint64(64 - _TABLE_BITS)).astype(np.intp)


@dataclass
class Signature:
    """What the receiver knows about its copy: one (weak, strong) pair per full block and the
    strong hash of the short tail block, if any."""

    block_size: int
    length: int
    weak: U64
    strong: bytes  # STRONG_LEN bytes per full block, concatenated
    tail_strong: bytes = b""
    _by_strong: dict[bytes, int] | None = field(default=None, repr=False)
    _table: npt.NDArray[np.bool_] | None = field(default=None, repr=False)
    _sorted_weak: U64 | None = field(default=None, repr=False)

    @property
    def nblocks(self) -> int:
        return int(self.weak.shape[0])

    @property
    def tail_len(self) -> int:
        return self.length - self.nblocks * self.block_size

    def strong_of(self, i: int) -> bytes:
        return self.strong[i * STRONG_LEN : (i + 1) * STRONG_LEN]

    def by_strong(self) -> dict[bytes, int]:
        if self._by_strong is None:
            d: dict[bytes, int] = {}
            for i in range(self.nblocks - 1, -1, -1):  # first index wins
                d[self.strong_of(i)] = i
            self._by_strong = d
        return self._by_strong

    def weak_filter(self) -> tuple[npt.NDArray[np.bool_], U64]:
        if self._table is None or self._sorted_weak is None:
            table = np.zeros(1 << _TABLE_BITS, dtype=np.bool_)
            if self.nblocks:
                table[_table_index(self.weak)] = True
            self._table = table
            self._sorted_weak = np.unique(self.weak)
        return self._table, self._sorted_weak

    # -- wire format: header, weak array, strong hashes, tail hash
    _HDR = struct.Struct("!4sIQQB")
    _MAGIC = b"HSG1"

    def encode(self) -> bytes:
        hdr = self._HDR.pack(
            self._MAGIC, self.block_size, self.length, self.nblocks, len(self.tail_strong)
        )
        return hdr + self.weak.astype(">u8").tobytes() + self.strong + self.tail_strong

    @classmethod
    def decode(cls, data: bytes) -> Signature:
        if len(data) < cls._HDR.size:
            raise DeltaError("signature: truncated header")
        magic, bs, length, nb, tl = cls._HDR.unpack_from(data)
        if magic != cls._MAGIC or not (1 <= bs <= (1 << 24)) or tl not in (0, STRONG_LEN):
            raise DeltaError("signature: bad header")
        if nb != length // bs or (tl == STRONG_LEN) != (length % bs != 0):
            raise DeltaError("signature: inconsistent block count")
        need = cls._HDR.size + nb * (8 + STRONG_LEN) + tl
        if len(data) != need:
            raise DeltaError(f"signature: expected {need} bytes, got {len(data)}")
        off = cls._HDR.size
        weak = np.frombuffer(data, dtype=">u8", count=nb, offset=off).astype(np.uint64)
        off += nb * 8
        strong = bytes(data[off : off + nb * STRONG_LEN])
        off += nb * STRONG_LEN
        return cls(bs, length, weak, strong, bytes(data[off : off + tl]))


# From this size on, a signature computes its weak checksums in a thread of their own while
# it hashes the blocks (numpy and hashlib release the GIL on large buffers): a 1 GiB
# file's signature is the full resync's longest wait, about 1 s of each.
PARALLEL_SIGNATURE = 16 << 20


def signature(basis: Buffer, block_size: int | None = None) -> Signature:
    """Block signature of ``basis`` (bytes, memoryview or mmap)."""
    x = _as_u8(basis)
    n = x.shape[0]
    bs = block_size or block_size_for(n)
    nb = n // bs
    mv = x.data
    with contextlib.ExitStack() as stack:
        weak_of: Callable[[], U64]
        if n >= PARALLEL_SIGNATURE:
            pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="weak"))
            weak_of = pool.submit(_block_weak, x, bs).result
        else:
            weak_of = lambda: _block_weak(x, bs)  # noqa: E731
        strong = b"".join(strong_hash(mv[i * bs : (i + 1) * bs]) for i in range(nb))
        tail = strong_hash(mv[nb * bs :]) if n % bs else b""
        weak = weak_of()
    return Signature(bs, n, weak, strong, tail)


# --------------------------------------------------------------------------- delta

COPY = 0
LITERAL = 1


@dataclass
class Delta:
    """Instructions to rebuild the sender's file: ``(COPY, basis_offset, length)`` and
    ``(LITERAL, data)``; consecutive copies are merged into one op."""

    length: int
    ops: list[tuple[int, int, int] | tuple[int, bytes]] = field(default_factory=list)

    @property
    def literal_bytes(self) -> int:
        return sum(len(op[1]) for op in self.ops if op[0] == LITERAL and isinstance(op[1], bytes))

    @property
    def copy_bytes(self) -> int:
        return self.length - self.literal_bytes

    def _copy(self, off: int, n: int) -> None:
        if self.ops:
            last = self.ops[-1]
            if last[0] == COPY and len(last) == 3:
                _, loff, ln = last
                if isinstance(loff, int) and loff + ln == off:
                    self.ops[-1] = (COPY, loff, ln + n)
                    return
        self.ops.append((COPY, off, n))

    def _literal(self, data: bytes) -> None:
        if data:
            self.ops.append((LITERAL, data))

    _HDR = struct.Struct("!4sQI")
    _MAGIC = b"HDL1"
    _COPY = struct.Struct("!BQQ")
    _LIT = struct.Struct("!BQ")

    def encode(self) -> bytes:
        parts = [self._HDR.pack(self._MAGIC, self.length, len(self.ops))]
        for op in self.ops:
            if op[0] == COPY and len(op) == 3:
                parts.append(self._COPY.pack(COPY, op[1], op[2]))
            elif isinstance(op[1], bytes):
                parts.append(self._LIT.pack(LITERAL, len(op[1])))
                parts.append(op[1])
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Delta:
        mv = memoryview(data)
        if len(mv) < cls._HDR.size:
            raise DeltaError("delta: truncated header")
        magic, length, nops = cls._HDR.unpack_from(mv)
        if magic != cls._MAGIC:
            raise DeltaError("delta: bad magic")
        off = cls._HDR.size
        d = cls(length)
        total = 0
        for _ in range(nops):
            if off >= len(mv):
                raise DeltaError("delta: truncated op")
            kind = mv[off]
            if kind == COPY:
                if off + cls._COPY.size > len(mv):
                    raise DeltaError("delta: truncated copy")
                _, boff, n = cls._COPY.unpack_from(mv, off)
                off += cls._COPY.size
                d.ops.append((COPY, boff, n))
                total += n
            elif kind == LITERAL:
                if off + cls._LIT.size > len(mv):
                    raise DeltaError("delta: truncated literal")
                _, n = cls._LIT.unpack_from(mv, off)
                off += cls._LIT.size
                if off + n > len(mv):
                    raise DeltaError("delta: truncated literal data")
                d.ops.append((LITERAL, bytes(mv[off : off + n])))
                off += n
                total += n
            else:
                raise DeltaError(f"delta: unknown op {kind}")
        if off != len(mv) or total != length:
            raise DeltaError("delta: length mismatch")
        return d


def _find_candidates(sig: Signature, x: U8, start: int, end: int) -> npt.NDArray[np.intp]:
    """Offsets k in [start, end - B] where a receiver block's weak checksum matches."""
    bs = sig.block_size
    w = _rolling_weak(x[start:end], bs, base=start)
    if w.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    table, sorted_weak = sig.weak_filter()
    hit = np.flatnonzero(table[_table_index(w)])
    if hit.shape[0] == 0:
        return hit
    vals = w[hit]
    pos = np.searchsorted(sorted_weak, vals)
    pos[pos >= sorted_weak.shape[0]] = 0
    exact = sorted_weak[pos] == vals
    return np.asarray(hit[exact] + start, dtype=np.intp)


def _next_match(sig: Signature, x: U8, start: int, try_match: Callable[[int], int]) -> int:
    """First offset >= start where a receiver block matches (rolling search in growing
    windows), or -1."""
    n = x.shape[0]
    bs = sig.block_size
    win = 4 * bs
    scan = start
    while scan <= n - bs:
        end = min(n, scan + win + bs - 1)
        for k in _find_candidates(sig, x, scan, end).tolist():
            if try_match(k) >= 0:
                return int(k)
        scan = end - bs + 1
        win = min(win * 2, 64 << 20)
    return -1


def block_hashes(data: Buffer, block_size: int, limit: int | None = None) -> bytes:
    """The strong hashes of the aligned full blocks of ``data`` (within its first ``limit``
    bytes: where the receiver has blocks), concatenated: the sender's own, computed while
    the receiver computes its signature (``delta(..., ours=...)``)."""
    mv = _as_u8(data).data
    n = min(len(mv), len(mv) if limit is None else limit) // block_size
    return b"".join(strong_hash(mv[i * block_size : (i + 1) * block_size]) for i in range(n))


def block_hashes_file(path: Path | str | bytes, block_size: int, limit: int | None = None) -> bytes:
    with _mapped(path) as m:
        return block_hashes(m, block_size, limit)


# Aligned blocks looked at after a mismatch for the next one still in place (rsync's first
# search window is as many): data changed in place over a few consecutive blocks is settled
# by as many strong hashes (already known: ``ours``) instead of a rolling search each.
IN_PLACE_AHEAD = 4


def _next_in_place(
    sig: Signature, mv: memoryview, pos: int, hint: int, hash_at: Callable[[int], bytes]
) -> tuple[int, int]:
    """(offset, basis block) of the first of the next IN_PLACE_AHEAD blocks after a
    mismatching block at ``pos`` where the new data holds the basis block expected there;
    (-1, -1) if none.

    Data changed in place (a database page, a log block: the common case) leaves the blocks
    after it where they were, and a strong hash each settles it, where the rolling search
    computes a checksum at every offset of a window (6 ms each: 17 s for a 1 GiB file with
    1 % of its blocks changed; with one block looked at, two changed blocks in a row still
    cost a search: 0.7 s of the 1 GiB case). A match at an unaligned offset in between is
    only found by the search; missing it costs at most IN_PLACE_AHEAD blocks of literal
    bytes. Data that moved leaves no block in place ahead: the search runs as before."""
    bs = sig.block_size
    base = hint if hint >= 0 else pos // bs if pos % bs == 0 else -1
    if base < 0:
        return -1, -1
    for j in range(1, IN_PLACE_AHEAD + 1):
        nxt, at = base + j, pos + j * bs
        if nxt >= sig.nblocks or at + bs > len(mv):
            break
        if hash_at(at) == sig.strong_of(nxt):
            return at, nxt
    return -1, -1


def _hasher(mv: memoryview, bs: int, ours: bytes | None) -> Callable[[int], bytes]:
    """The strong hash of ``mv[k:k+bs]``: from ``ours`` at an aligned offset it covers."""
    known = len(ours) // STRONG_LEN * bs if ours is not None else 0

    def hash_at(k: int) -> bytes:
        if ours is not None and k % bs == 0 and k + bs <= known:
            return ours[k // bs * STRONG_LEN : (k // bs + 1) * STRONG_LEN]
        return strong_hash(mv[k : k + bs])

    return hash_at


def delta(sig: Signature, new: Buffer, ours: bytes | None = None) -> Delta:
    """Instructions turning the receiver's basis (described by ``sig``) into ``new``.

    ``ours``: ``block_hashes(new, sig.block_size)``, if already computed (data changed in
    place is then matched without hashing anything here)."""
    x = _as_u8(new)
    mv = x.data
    n = x.shape[0]
    bs = sig.block_size
    out = Delta(n)
    by_strong = sig.by_strong()
    tail_len = sig.tail_len
    pos = 0  # next byte of `new` not yet described
    lit = 0  # start of the pending literal run
    hint = -1  # basis block expected next (continuation of the previous copy)
    hash_at = _hasher(mv, bs, ours)

    def try_match(k: int) -> int:
        """Basis block index whose strong hash equals new[k:k+bs], or -1."""
        h = hash_at(k)
        if hint >= 0 and hint < sig.nblocks and sig.strong_of(hint) == h:
            return hint
        return by_strong.get(h, -1)

    while pos < n:
        if n - pos < bs:
            # Only the receiver's short tail block can still match, and only at the very end.
            if tail_len and n - pos == tail_len and strong_hash(mv[pos:]) == sig.tail_strong:
                out._literal(bytes(mv[lit:pos]))
                out._copy(sig.nblocks * bs, tail_len)
                lit = pos = n
            break
        if sig.nblocks:
            i = try_match(pos)
            if i >= 0:
                out._literal(bytes(mv[lit:pos]))
                out._copy(i * bs, bs)
                pos += bs
                lit = pos
                hint = i + 1
                continue
        else:
            # Nothing to match but the tail: jump to where it could match.
            if tail_len and n - tail_len > pos:
                pos = n - tail_len
                continue
            break
        # Mismatch at pos: first the block after it, where data changed in place left it.
        at, nxt = _next_in_place(sig, mv, pos, hint, hash_at)
        if nxt >= 0:
            pos, hint = at, nxt  # next iteration copies it (the hint is checked first)
            continue
        # Otherwise (data shifted): search forward with the rolling checksum.
        found = _next_match(sig, x, pos + 1, try_match)
        if found < 0:
            # No more receiver blocks ahead; maybe the tail, at the very end.
            if tail_len and n - tail_len > pos:
                pos = n - tail_len
                continue
            pos = n
            break
        pos = found  # next iteration copies it
    out._literal(bytes(mv[lit:n]))
    return out


def split(d: Delta, max_bytes: int, max_output: int = 1 << 62) -> Iterator[Delta]:
    """``d`` cut into consecutive pieces whose encoding stays near ``max_bytes`` and that
    rebuild at most ``max_output`` bytes each (long copies and literals are cut too), so a
    delta of any size travels in bounded frames and each piece applies in bounded time.
    Patching the pieces one after the other, appending, rebuilds the file ``d`` rebuilds."""
    if max_bytes < 1024 or max_output < 1:
        raise ValueError("pieces too small")
    piece = Delta(0)
    size = 0

    def full(need: int) -> bool:
        return bool(piece.ops) and (size + need > max_bytes or piece.length >= max_output)

    for op in d.ops:
        if op[0] == COPY and len(op) == 3:
            _, off, n = op
            while n > 0:
                if full(Delta._COPY.size):
                    yield piece
                    piece, size = Delta(0), 0
                take = min(n, max_output - piece.length)
                piece.ops.append((COPY, off, take))
                piece.length += take
                size += Delta._COPY.size
                off += take
                n -= take
            continue
        data = op[1]
        assert isinstance(data, bytes)
        pos = 0
        while pos < len(data):
            if full(Delta._LIT.size + 1):
                yield piece
                piece, size = Delta(0), 0
            room = min(max_bytes - size - Delta._LIT.size, max_output - piece.length)
            part = data[pos : pos + room]
            piece.ops.append((LITERAL, part))
            piece.length += len(part)
            size += Delta._LIT.size + len(part)
            pos += len(part)
    if piece.ops or d.length == 0:
        yield piece


def _in_place_end(d: Delta, start: int = 0, size: int | None = None) -> int | None:
    """Where ``d``'s output ends if it begins at ``start`` and every copy takes its bytes
    from where they end up (within ``size`` bytes of basis, if given); else None."""
    pos = start
    for op in d.ops:
        if op[0] == COPY and len(op) == 3:
            if op[1] != pos or (size is not None and pos + op[2] > size):
                return None
            pos += op[2]
        elif isinstance(op[1], bytes):
            pos += len(op[1])
    return pos


def in_place(d: Delta) -> bool:
    """Whether every copy of ``d`` takes its bytes from where they end up. Then the receiver
    can patch its file where it lies (literals written over it, copies left alone), with no
    second copy of the file: data changed in place, appended or truncated gives such a delta;
    data shifted does not."""
    return _in_place_end(d) is not None


def patch_in_place(fd: int, d: Delta, start: int = 0) -> int:
    """Apply a piece of an in-place delta (``in_place``) to the file open as ``fd``: the
    piece's output begins at ``start``. Only the literals are written. Returns the offset
    after the piece. DeltaError (before any write) if a copy is not in place or reaches past
    the end of the file."""
    end = _in_place_end(d, start, os.fstat(fd).st_size)
    if end is None:
        raise DeltaError("delta copy not in place")
    if end - start != d.length:
        raise DeltaError("delta length mismatch")
    pos = start
    for op in d.ops:
        if op[0] == COPY and len(op) == 3:
            pos += op[2]
        elif isinstance(op[1], bytes):
            mv = memoryview(op[1])
            while mv:
                n = os.pwrite(fd, mv, pos)
                mv, pos = mv[n:], pos + n
    return pos


def patch(basis: Buffer, d: Delta) -> bytes:
    """The sender's file rebuilt from ``basis`` and ``d``."""
    buf = io.BytesIO()
    for chunk in iter_patch(basis, d):
        buf.write(chunk)
    return buf.getvalue()


def iter_patch(basis: Buffer, d: Delta) -> Iterator[bytes | memoryview]:
    mv = memoryview(basis) if not isinstance(basis, memoryview) else basis
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    total = 0
    for op in d.ops:
        if op[0] == COPY and len(op) == 3:
            _, off, ln = op
            if off < 0 or off + ln > len(mv):
                raise DeltaError("delta copies beyond the basis")
            total += ln
            yield mv[off : off + ln]
        elif isinstance(op[1], bytes):
            total += len(op[1])
            yield op[1]
    if total != d.length:
        raise DeltaError("delta length mismatch")


# --------------------------------------------------------------------------- files


def _close(m: mmap.mmap | bytes) -> None:
    # A numpy view or memoryview may still reference the map; it then closes when collected.
    if isinstance(m, mmap.mmap):
        with contextlib.suppress(BufferError):
            m.close()


def _map(fd: int) -> mmap.mmap | bytes:
    size = os.fstat(fd).st_size
    if size == 0:
        return b""
    return mmap.mmap(fd, 0, prot=mmap.PROT_READ)


@contextlib.contextmanager
def _mapped_fd(fd: int) -> Iterator[mmap.mmap | bytes]:
    """The file's bytes without reading them in (b"" when empty)."""
    m = _map(fd)
    try:
        yield m
    finally:
        _close(m)


@contextlib.contextmanager
def _mapped(path: Path | str | bytes) -> Iterator[mmap.mmap | bytes]:
    fd = open_file(path)
    try:
        with _mapped_fd(fd) as m:
            yield m
    finally:
        os.close(fd)


def signature_fd(fd: int, block_size: int | None = None) -> Signature:
    """The signature of an open regular file (the secondary opens it beneath its root)."""
    with _mapped_fd(fd) as m:
        return signature(m, block_size)


def signature_file(path: Path | str | bytes, block_size: int | None = None) -> Signature:
    with _mapped(path) as m:
        return signature(m, block_size)


def delta_file(sig: Signature, path: Path | str | bytes, ours: bytes | None = None) -> Delta:
    with _mapped(path) as m:
        return delta(sig, m, ours)


def patch_file(basis: Path | str, d: Delta, out: Path | str) -> None:
    """Write the rebuilt file to ``out`` (fsync'd); ``basis`` may be missing (empty)."""
    try:
        fd = open_file(basis)
    except FileNotFoundError:
        fd = -1
    try:
        m = _map(fd) if fd >= 0 else b""
        try:
            with open(out, "wb") as o:
                for chunk in iter_patch(m, d):
                    o.write(chunk)
                o.flush()
                os.fsync(o.fileno())
        finally:
            _close(m)
    finally:
        if fd >= 0:
            os.close(fd)
