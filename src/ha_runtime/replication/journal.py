"""Operation journal: typed records of every mutating file operation, and the frames that
carry them on the wire (to the secondary) and on disk (dirty log).

Frame layout (network byte order)::

    magic "HJ" | version u8 | kind u8 | length u32 | payload[length] | tag[16]

``tag`` is HMAC-SHA256 of header + payload truncated to 128 bits (version 2; version 1
frames, read still, carry a keyed BLAKE2b-128), key derived from the site key; an empty key
makes it a plain checksum for local files (so the dirty and activity logs do not depend on
the site key, and survive its rotation). During a rotation a decoder also verifies tags
made with the keys it is told to accept (``FrameDecoder.accepted``). Version 3 is the same
frame without the tag (``magic | 3 | kind | length | payload``): only for the primary's
frames inside the mutually authenticated TLS 1.3 link, whose AEAD already authenticates
every byte, and only once the secondary said it reads them; a decoder refuses it
(``bad_version``) unless told to accept it, so a file on disk (dirty log) always keeps its
tag. Decoding is strict: a bad magic, version, kind, length, tag or payload rejects the
frame with a counted reason; nothing is ever applied from a frame that did not verify, and
the decoder never raises.

Long because: one codec; the record and frame formats and their strict decoders belong together.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"HJ"
# Version 2: HMAC-SHA256 tags (OpenSSL, SHA extensions: ~5x cheaper per MiB than CPython's
# BLAKE2b, which cost a third of the primary's CPU on 1 MiB writes). Version 1 (BLAKE2b)
# is still read, for dirty logs written before the change.
VERSION = 2
# Version 3: no tag, inside the TLS link only (its HMAC on both ends was about a fifth of the
# replicas' CPU on 1 MiB writes, redundant with TLS 1.3's AEAD between authenticated peers).
UNTAGGED_VERSION = 3
VERSIONS = frozenset({1, 2, UNTAGGED_VERSION})
TAG_LEN = 16
HEADER = struct.Struct("!2sBBI")
MAX_PAYLOAD = 16 << 20
# A decoded payload at least this large is a view of the receive buffer, not a copy: the
# secondary copied each 1 MiB write three times after decrypting it (~15 % of its CPU).
SHARE_MIN = 64 << 10
MAX_PATH = 4096
MAX_NAME = 255


class Kind(enum.IntEnum):
    RECORD = 1  # a journal Record (live replication or resync)
    ACK = 2  # received_seq, durable_seq
    HELLO = 3  # JSON: client's identity, module, generation, resync intent
    WELCOME = 4  # JSON: server's answer
    PING = 5
    PONG = 6
    ERROR = 7  # JSON: fatal error from the peer (e.g. disk full)
    CONTROL = 8  # JSON request/response used by resync and verify


class Op(enum.IntEnum):
    WRITE = 1
    TRUNCATE = 2
    CREATE = 3
    MKNOD = 4
    MKDIR = 5
    UNLINK = 6
    RMDIR = 7
    RENAME = 8
    SYMLINK = 9
    LINK = 10
    SETATTR = 11
    SETXATTR = 12
    REMOVEXATTR = 13
    FALLOCATE = 14
    FSYNC = 15  # barrier: everything before it durable (file given in path)
    DELTA = 16  # full resync: data = encoded delta.Delta against the receiver's copy
    REPLACE = 17  # full resync: data = the whole (small) file
    BATCH = 18  # resync: data = records applied in order as one (``batch``); path empty


# SETATTR flags
SET_MODE = 1
SET_UID = 2
SET_GID = 4
SET_ATIME = 8
SET_MTIME = 16
SET_SIZE = 32
# FSYNC flags
FSYNC_DATA = 1
# DELTA flags: a delta travels in pieces (frames are bounded); offset = output offset.
# Neither flag: the whole delta in one record.
DELTA_CONT = 1  # continues the delta opened by the previous piece for this path
DELTA_MORE = 2  # more pieces follow: keep the new file open
# Every copy of the whole delta is in place (delta.in_place): the receiver may write the
# literals over its file instead of building a new one. A receiver that ignores it rebuilds.
DELTA_IN_PLACE = 4

NAMESPACE_OPS = frozenset(
    {
        Op.CREATE,
        Op.MKNOD,
        Op.MKDIR,
        Op.UNLINK,
        Op.RMDIR,
        Op.RENAME,
        Op.SYMLINK,
        Op.LINK,
        Op.SETATTR,
        Op.SETXATTR,
        Op.REMOVEXATTR,
    }
)
_TWO_PATH_OPS = frozenset({Op.RENAME, Op.SYMLINK, Op.LINK})
_EMPTY_PATH_OK = frozenset({Op.SETATTR, Op.SETXATTR, Op.REMOVEXATTR, Op.FSYNC, Op.BATCH})

# uid and gid are unsigned (all 32 bits of uid_t; they were signed, so an id >= 2**31 did
# not pack). 0xFFFFFFFF, (uid_t)-1, is "unchanged" and reads as -1: the same bytes as the
# signed encoding of -1, so either side may be older for every id below 2**31.
_REC = struct.Struct("!QBIQQIIIQqqHHHI")
ID_UNCHANGED = 0xFFFFFFFF


def _wire_id(v: int, field: str) -> int:
    if v == -1:
        return ID_UNCHANGED
    if not 0 <= v <= ID_UNCHANGED:
        raise RecordError(f"{field} {v} out of range (0..{ID_UNCHANGED}, or -1: unchanged)")
    return v


def _record_id(v: int) -> int:
    return -1 if v == ID_UNCHANGED else v


@dataclass(frozen=True, slots=True)
class Record:
    """One mutating operation. ``path`` is relative to the replicated directory's root
    (``b""`` is the root itself), ``/``-separated, without ``.``/``..`` components."""

    seq: int
    op: Op
    path: bytes
    path2: bytes = b""  # rename target, symlink target, link's new name
    offset: int = 0  # write/fallocate offset, truncate size
    length: int = 0  # fallocate length
    mode: int = 0  # file mode (create/mknod/mkdir/setattr); fallocate mode
    uid: int = -1
    gid: int = -1
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    flags: int = 0  # SET_* for setattr, FSYNC_DATA, rename flags, xattr flags
    name: bytes = b""  # xattr name
    # written bytes, xattr value, delta, whole file; a large one decoded from the wire is a
    # view of the receive buffer (see SHARE_MIN)
    data: bytes | memoryview = b""

    def head(self) -> bytes:
        """The encoded record without its data (which follows it on the wire)."""
        return (
            _REC.pack(
                self.seq,
                int(self.op),
                self.flags,
                self.offset,
                self.length,
                self.mode,
                _wire_id(self.uid, "uid"),
                _wire_id(self.gid, "gid"),
                self.rdev,
                self.atime_ns,
                self.mtime_ns,
                len(self.path),
                len(self.path2),
                len(self.name),
                len(self.data),
            )
            + self.path
            + self.path2
            + self.name
        )

    def encode(self) -> bytes:
        return self.head() + self.data

    @property
    def end(self) -> int:
        """First byte after what a data op touched."""
        if self.op == Op.WRITE:
            return self.offset + len(self.data)
        if self.op == Op.FALLOCATE:
            return self.offset + self.length
        return self.offset

    @property
    def wire_size(self) -> int:
        return _REC.size + len(self.path) + len(self.path2) + len(self.name) + len(self.data)


class RecordError(ValueError):
    pass


def valid_path(p: bytes, allow_empty: bool = False) -> bool:
    if not p:
        return allow_empty
    if len(p) > MAX_PATH or b"\0" in p or p.startswith(b"/") or p.endswith(b"/"):
        return False
    return all(c not in (b"", b".", b"..") and len(c) <= MAX_NAME for c in p.split(b"/"))


def decode_record(payload: bytes | memoryview) -> Record:
    """Strict decoding; raises RecordError with the reason."""
    if len(payload) < _REC.size:
        raise RecordError("record_truncated")
    (
        seq,
        op,
        flags,
        offset,
        length,
        mode,
        uid,
        gid,
        rdev,
        atime,
        mtime,
        lp,
        lp2,
        ln,
        ld,
    ) = _REC.unpack_from(payload)
    if _REC.size + lp + lp2 + ln + ld != len(payload):
        raise RecordError("record_length")
    try:
        o = Op(op)
    except ValueError:
        raise RecordError("record_op") from None
    mv = memoryview(payload)
    i = _REC.size
    path = bytes(mv[i : i + lp])
    i += lp
    path2 = bytes(mv[i : i + lp2])
    i += lp2
    name = bytes(mv[i : i + ln])
    i += ln
    # A large payload is already a view of its own buffer: its data is not copied again.
    data = mv[i : i + ld] if isinstance(payload, memoryview) else bytes(mv[i : i + ld])
    if not valid_path(path, allow_empty=o in _EMPTY_PATH_OK):
        raise RecordError("record_path")
    if o in (Op.RENAME, Op.LINK) and not valid_path(path2):
        raise RecordError("record_path")
    if o == Op.SYMLINK and (not path2 or b"\0" in path2 or len(path2) > MAX_PATH):
        raise RecordError("record_path")
    if o not in _TWO_PATH_OPS and path2:
        raise RecordError("record_fields")
    if o in (Op.SETXATTR, Op.REMOVEXATTR) and (not name or len(name) > MAX_NAME):
        raise RecordError("record_fields")
    if offset > (1 << 62) or length > (1 << 62):
        raise RecordError("record_range")
    uid, gid = _record_id(uid), _record_id(gid)
    return Record(
        seq, o, path, path2, offset, length, mode, uid, gid, rdev, atime, mtime, flags, name, data
    )


# --------------------------------------------------------------------------- frames


def derive_key(site_key: bytes, purpose: bytes = b"hapair replication v1") -> bytes:
    return hashlib.sha256(site_key + b"\0" + purpose).digest() if site_key else b""


def _tag(key: bytes, header: bytes | memoryview, *payload: bytes | memoryview) -> bytes:
    """Tag of a frame (payload possibly in pieces); the algorithm is the one of the version
    in ``header``."""
    h: Any
    if header[2] == 1:
        h = hashlib.blake2b(key=key, digest_size=TAG_LEN)
        h.update(header)
    else:
        h = hmac.new(key, header, "sha256")
    for p in payload:
        h.update(p)
    return bytes(h.digest()[:TAG_LEN])


def _frame(kind: Kind, key: bytes, *payload: bytes | memoryview, tag: bool = True) -> bytes:
    """A version 2 frame, or with ``tag=False`` a version 3 one (no tag: only for the TLS
    link, once the peer reads them)."""
    # One join: a 1 MiB write is copied once into its frame, not once per concatenation.
    n = sum(len(p) for p in payload)
    if n > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {n} bytes exceeds {MAX_PAYLOAD}")
    if not tag:
        return b"".join((HEADER.pack(MAGIC, UNTAGGED_VERSION, int(kind), n), *payload))
    hdr = HEADER.pack(MAGIC, VERSION, int(kind), n)
    return b"".join((hdr, *payload, _tag(key, hdr, *payload)))


def encode_frame(kind: Kind, payload: bytes, key: bytes = b"", *, tag: bool = True) -> bytes:
    return _frame(kind, key, payload, tag=tag)


def encode_json(kind: Kind, obj: dict[str, Any], key: bytes = b"") -> bytes:
    return encode_frame(kind, json.dumps(obj, separators=(",", ":")).encode(), key)


_ACK = struct.Struct("!QQ")


def encode_ack(received: int, durable: int, key: bytes = b"") -> bytes:
    return encode_frame(Kind.ACK, _ACK.pack(received, durable), key)


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    payload: bytes | memoryview

    def json(self) -> dict[str, Any] | None:
        """The JSON object of a HELLO/WELCOME/ERROR/CONTROL frame, or None if malformed."""
        try:
            obj = json.loads(bytes(self.payload))
        # RecursionError: deeply nested JSON ("[[[[...") overflows the decoder's stack.
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        return obj if isinstance(obj, dict) else None

    def ack(self) -> tuple[int, int] | None:
        if self.kind != Kind.ACK or len(self.payload) != _ACK.size:
            return None
        r, d = _ACK.unpack(self.payload)
        return int(r), int(d)


@dataclass
class FrameDecoder:
    """Incremental, strict decoder for one byte stream.

    ``feed`` returns the frames completed by the new bytes. The first bad frame makes the
    stream ``failed`` (a byte stream cannot be re-synchronised safely): later bytes are
    ignored, the reason is counted in ``rejected`` and kept in ``failed``.

    Version 3 frames (no tag) are refused as ``bad_version`` until ``untagged`` is set: only
    a TLS link whose peer announced them sets it, never a reader of a file.

    ``accepted``: other keys a tag may be made with (a site key rotation: the peer may
    still, or already, use the other key); tried only for a tag ``key`` refuses, so the
    usual frame costs one MAC. Each frame taken so is counted and ``on_accepted`` called.
    """

    key: bytes = b""
    max_payload: int = MAX_PAYLOAD
    untagged: bool = False
    accepted: tuple[bytes, ...] = ()
    on_accepted: Callable[[], None] | None = None
    accepted_frames: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    failed: str | None = None
    _buf: bytearray = field(default_factory=bytearray)
    consumed: int = 0  # bytes of complete, valid frames so far

    def _fail(self, reason: str) -> None:
        # The buffer is cleared by feed() once no view of it is held.
        self.failed = reason
        self.rejected[reason] += 1

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self.failed:
            return []
        # Frames are parsed in place: from ``data`` itself when nothing is pending (only an
        # incomplete tail is kept), else from the pending buffer with ``data`` appended.
        buf: bytes | bytearray | memoryview = data
        if self._buf:
            self._buf += data
            buf = self._buf
        # A large payload is handed out as a view, not copied: of ``data`` if immutable, or
        # of the pending buffer, which is then left to the views and replaced.
        shareable = isinstance(buf, bytes) or buf is self._buf
        shared = False
        out: list[Frame] = []
        pos = 0
        with memoryview(buf).toreadonly() as mv:  # views handed out are read-only
            end = len(mv)
            while end - pos >= HEADER.size:
                magic, version, kind, length = HEADER.unpack_from(mv, pos)
                if magic != MAGIC:
                    self._fail("bad_magic")
                    break
                tagged = version != UNTAGGED_VERSION
                if version not in VERSIONS or not (tagged or self.untagged):
                    self._fail("bad_version")
                    break
                if length > self.max_payload:
                    self._fail("oversized")
                    break
                body = pos + HEADER.size
                total = HEADER.size + length + (TAG_LEN if tagged else 0)
                if end - pos < total:
                    break
                payload: bytes | memoryview
                if shareable and length >= SHARE_MIN:
                    payload, shared = mv[body : body + length], True
                else:
                    payload = bytes(mv[body : body + length])
                # (No view kept in a local: it would outlive ``mv`` and pin ``self._buf``.)
                if (
                    tagged
                    and not hmac.compare_digest(
                        _tag(self.key, mv[pos:body], payload), mv[body + length : pos + total]
                    )
                    and not self._accepted_tag(
                        mv[pos:body], payload, mv[body + length : pos + total]
                    )
                ):
                    self._fail("bad_tag")
                    break
                try:
                    k = Kind(kind)
                except ValueError:
                    self._fail("bad_kind")
                    break
                pos += total
                self.consumed += total
                out.append(Frame(k, payload))
            if (buf is not self._buf or shared) and not self.failed:
                self._buf = bytearray(mv[pos:])
        if self.failed:
            self._buf = bytearray()  # not clear(): views of it may be out
        elif buf is self._buf:
            del self._buf[:pos]
        return out

    def _accepted_tag(
        self, header: memoryview, payload: bytes | memoryview, tag: memoryview
    ) -> bool:
        """Whether one of the ``accepted`` keys made ``tag`` (counted when one did)."""
        for key in self.accepted:
            if hmac.compare_digest(_tag(key, header, payload), tag):
                self.accepted_frames += 1
                if self.on_accepted is not None:
                    self.on_accepted()
                return True
        return False

    def finish(self) -> None:
        """End of stream: leftover bytes are a truncated frame."""
        if not self.failed and self._buf:
            self._fail("truncated")
            self._buf.clear()

    @property
    def pending(self) -> int:
        return len(self._buf)


def record_frame(rec: Record, key: bytes = b"", *, tag: bool = True) -> bytes:
    return _frame(Kind.RECORD, key, rec.head(), rec.data, tag=tag)


def read_records(data: bytes, key: bytes = b"") -> tuple[list[Record], int, Counter[str]]:
    """Decode a whole file of RECORD frames: (records, length of the valid prefix, rejects).

    A torn or corrupt tail stops the reading there; the caller truncates to the prefix."""
    dec = FrameDecoder(key)
    frames = dec.feed(data)
    dec.finish()
    recs: list[Record] = []
    good = 0
    pos = 0
    for f in frames:
        size = HEADER.size + len(f.payload) + TAG_LEN
        if f.kind != Kind.RECORD:
            dec.rejected["unexpected_kind"] += 1
            break
        try:
            recs.append(decode_record(f.payload))
        except RecordError as e:
            dec.rejected[str(e)] += 1
            break
        pos += size
        good = pos
    return recs, good, dec.rejected
