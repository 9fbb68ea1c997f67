"""A resync's small records travelling as one (``Op.BATCH``): the primary packs them, the
secondary applies them in order in one go (``secondary.applier``).

An incremental resync of 5 % of a tree of 10,000 files is about 1,300 records of a few
bytes to 100 KiB each (a file's ranges, its metadata, creations, removals). One by one,
each cost the secondary a trip through its event loop (receive, decode, apply, an ack
every few) and the primary a wait for room. A batch of about ``BATCH_BYTES`` is one
record, whose entries the secondary applies in a tight loop.

Layout of the BATCH record's data: entries ``length u32 | encoded record`` (seq 0), in the
order they are applied. Only the operations a resync sends may be in one (``BATCHABLE``):
no barrier (a FSYNC's sequence number is what the primary waits for), no batch, no delta
piece. A secondary says it applies batches in its HELLO answer (``"batch": true``); an
older one is never sent one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

from ha_runtime.replication.journal import Op, Record, RecordError, decode_record

# Batches are closed past this size. Most stay under the secondary's threshold for a worker
# thread (256 KiB), so it applies them in its loop in a ms or two: loopback, 1.09 GiB / 5 %
# case, 128 KiB batches took 0.32-0.44 s, 512 KiB ones (a thread hop each) 0.33-0.59 s, and
# single records 0.33-0.56 s, all on the same busy 2-vCPU machine.
BATCH_BYTES = 128 << 10
# At most this many entries in one batch (a batch of metadata only stays short too).
BATCH_ENTRIES = 512

BATCHABLE = frozenset(
    {
        Op.WRITE,
        Op.TRUNCATE,
        Op.CREATE,
        Op.MKNOD,
        Op.MKDIR,
        Op.UNLINK,
        Op.SYMLINK,
        Op.SETATTR,
    }
)

_LEN = struct.Struct("!I")


class BatchError(RecordError):
    """A malformed batch, or an entry that may not be in one."""


class Builder:
    """The data of one BATCH record, built in one buffer: a file's bytes are read straight
    into it (``read``). A read into a new bytes object and a join of the batch were two more
    copies of every byte, each about as costly as the encryption on the lab's machine."""

    def __init__(self) -> None:
        self._buf = bytearray(BATCH_BYTES * 2)
        self.size = 0
        self.count = 0

    def _room(self, n: int) -> None:
        if self.size + n > len(self._buf):
            self._buf.extend(bytes(self.size + n - len(self._buf) + BATCH_BYTES))

    def add(self, rec: Record) -> None:
        if rec.op not in BATCHABLE:
            raise ValueError(f"{rec.op.name} cannot travel in a batch")
        head = rec.head()
        n = len(head) + len(rec.data)
        self._room(_LEN.size + n)
        at = self.size
        _LEN.pack_into(self._buf, at, n)
        self._buf[at + _LEN.size : at + _LEN.size + len(head)] = head
        self._buf[at + _LEN.size + len(head) : at + _LEN.size + n] = rec.data
        self.size += _LEN.size + n
        self.count += 1

    def read(self, fd: int, path: bytes, offset: int, length: int) -> int:
        """Add a WRITE of up to ``length`` bytes of ``fd`` at ``offset``, read into the batch;
        the number of bytes read (0: nothing added, end of file)."""
        hlen = len(Record(0, Op.WRITE, path, offset=offset).head())
        self._room(_LEN.size + hlen + length)
        at = self.size + _LEN.size + hlen
        with memoryview(self._buf) as mv:
            n = os.preadv(fd, [mv[at : at + length]], offset)
            if n:
                rec = Record(0, Op.WRITE, path, offset=offset, data=mv[at : at + n])
                mv[at - hlen : at] = rec.head()
                _LEN.pack_into(mv, self.size, hlen + n)
                del rec
        if n:
            self.size += _LEN.size + hlen + n
            self.count += 1
        return n

    def take(self) -> memoryview:
        """The batch's data, a view of its buffer, never written again (the next batch gets
        a buffer of its own: the link may keep the record until it frames it)."""
        data = memoryview(self._buf)[: self.size]
        self._buf = bytearray(BATCH_BYTES * 2)
        self.size = self.count = 0
        return data


def entries(data: bytes | memoryview) -> Iterator[Record]:
    """Decode the entries of a batch in order, each strictly (``decode_record``); data of an
    entry is a view of ``data``. BatchError for a malformed batch or a forbidden entry,
    raised when that entry is reached (the ones before it are yielded first)."""
    mv = memoryview(data)
    pos, end, i = 0, len(mv), 0
    while pos < end:
        if end - pos < _LEN.size:
            raise BatchError(f"batch entry {i}: truncated length")
        (n,) = _LEN.unpack_from(mv, pos)
        pos += _LEN.size
        if n > end - pos:
            raise BatchError(f"batch entry {i}: length {n} past the end of the batch")
        try:
            rec = decode_record(mv[pos : pos + n])
        except RecordError as e:
            raise BatchError(f"batch entry {i}: {e}") from None
        if rec.op not in BATCHABLE or rec.seq:
            raise BatchError(f"batch entry {i}: {rec.op.name} (seq {rec.seq}) not allowed")
        pos += n
        i += 1
        yield rec
