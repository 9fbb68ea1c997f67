"""A resync's progress and what it has yet to reconcile: the application's operations on
those paths are held back (``hold``: noted dirty, not shipped) until the pass reads them."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ha_runtime.replication.dirtylog import INF, RangeSet
from ha_runtime.replication.journal import Op, Record


@dataclass
class Progress:
    kind: str = "incremental"
    bytes_total: int = 0
    bytes_done: int = 0
    files_done: int = 0
    started: float = field(default_factory=time.monotonic)
    pinged_seq: int = 0  # last record sent before the resync's latest keepalive
    queued_s: float | None = None  # when everything was queued (the rest: the final barrier)
    # The peer applies BATCH records (its HELLO said so): small records travel packed.
    batch: bool = False
    # Paths that could not be read or listed here (not gone: an error other than "no such
    # file"); reconciled again by the next round of ``settle``.
    retry: set[bytes] = field(default_factory=set)
    # Paths the pass has yet to reconcile (``all_pending``: every path, a delta over the
    # tree in progress). The application's operations on them are held back (``hold``):
    # the peer may lack them yet (a WRITE to a file it does not have fails there, the link
    # dropped and every reconnection repeated it).
    pending: set[bytes] = field(default_factory=set)
    all_pending: bool = False
    # Directories above pending paths, with how many pending paths each holds (an rmdir or
    # a rename of one is held back too).
    above: dict[bytes, int] = field(default_factory=dict)
    # Paths of operations held back that this pass will not reconcile: the next round will.
    leftover: set[bytes] = field(default_factory=set)
    # What the operations held back changed, by path: the path's reconciliation sends it.
    held: dict[bytes, RangeSet] = field(default_factory=dict)
    # Files whose ranges are on their way: a rename or link of one (or of a directory above)
    # is held back too, or the rest of its ranges would go to the old name.
    sending: set[bytes] = field(default_factory=set)

    @property
    def bytes_left(self) -> int:
        return max(0, self.bytes_total - self.bytes_done)

    @property
    def rate_bps(self) -> float:
        dt = time.monotonic() - self.started
        return self.bytes_done / dt if dt > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        r = self.rate_bps
        return self.bytes_left / r if r > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "bytes_done": self.bytes_done,
            "bytes_left": self.bytes_left,
            "rate_bps": round(self.rate_bps),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "files_done": self.files_done,
            "queued_s": None if self.queued_s is None else round(self.queued_s, 3),
        }


def hold(progress: Progress, rec: Record) -> bool:
    """True: do not ship the application's operation ``rec`` now (it is in the dirty log,
    and among the changes ``settle`` gathers); a path of it, or a directory above one, is
    still to be reconciled by this pass, which then reads it as it is. Its paths are held
    until reconciled, and those the pass will not reach are left to the next round."""
    moves = rec.op in (Op.RENAME, Op.LINK)
    names = (rec.path, rec.path2) if moves else (rec.path,)
    moving = moves and any(in_scope(f, set(names)) for f in progress.sending)
    if not (
        progress.all_pending
        or moving
        or any(in_scope(p, progress.pending) or p in progress.above for p in names)
    ):
        return False
    for p in names:
        if not progress.all_pending:
            pend(progress, p)
        progress.leftover.add(p)
    if moves or rec.op in _TYPE_OPS:
        # The peer's copy of the names moved is unknown now, or what is there may be of
        # another type than ours (a directory replaced by a file): listed and compared by
        # a checksum delta, whole subtrees, next round (a reconciliation by name assumes
        # the peer holds the same kind of thing).
        progress.retry |= set(names)
    rs = progress.held.setdefault(rec.path, RangeSet())
    if rec.op in (Op.WRITE, Op.FALLOCATE):
        rs.add(rec.offset, rec.offset + (rec.length if rec.op == Op.FALLOCATE else len(rec.data)))
    elif rec.op == Op.TRUNCATE:
        rs.add(rec.offset, INF)
    return True


_TYPE_OPS = frozenset({Op.CREATE, Op.MKNOD, Op.MKDIR, Op.SYMLINK, Op.UNLINK, Op.RMDIR})


def ancestors(p: bytes) -> Iterator[bytes]:
    while b"/" in p:
        p = p.rpartition(b"/")[0]
        yield p


def pend(progress: Progress, p: bytes) -> None:
    if p not in progress.pending:
        progress.pending.add(p)
        for a in ancestors(p):
            progress.above[a] = progress.above.get(a, 0) + 1


def pend_all(progress: Progress, paths: Iterable[bytes]) -> None:
    progress.pending, progress.above = set(), {}
    for p in paths:
        pend(progress, p)


def reconciled(progress: Progress, rel: bytes) -> None:
    """``rel`` is read as it is now: what was held back for it is included."""
    progress.leftover.discard(rel)
    unpend(progress, rel)


def unpend(progress: Progress, rel: bytes) -> None:
    if rel in progress.pending:
        progress.pending.discard(rel)
        for a in ancestors(rel):
            n = progress.above.get(a, 0) - 1
            if n > 0:
                progress.above[a] = n
            else:
                progress.above.pop(a, None)


def in_scope(p: bytes, scope: set[bytes]) -> bool:
    """``p`` is one of ``scope`` or under one of them."""
    while True:
        if p in scope:
            return True
        if b"/" not in p:
            return False
        p = p.rpartition(b"/")[0]
