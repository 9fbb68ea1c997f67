"""The full pass: the secondary lists its tree; every file that differs travels as an rsync
delta against the secondary's copy; what the primary lacks is removed (quarantined first
on a split brain)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import trio

from ha_runtime.replication import control
from ha_runtime.replication import delta as D
from ha_runtime.replication.dirtylog import DirtyState
from ha_runtime.replication.journal import (
    DELTA_CONT,
    DELTA_IN_PLACE,
    DELTA_MORE,
    Op,
    Record,
)
from ha_runtime.replication.link.framing import LinkLost
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.resync.progress import Progress
from ha_runtime.replication.resync.send import (
    REMOVE_ANY,
    SMALL_FILE,
    abs_path,
    absent,
    read_small,
    reconcile,
    room,
    same_or_longer,
    send_meta_now,
    send_ranges,
)
from ha_runtime.replication.tree import list_tree

log = logging.getLogger("hapair.replication")

DELTA_PIECE = 4 << 20  # well under the 16 MiB frame limit
DELTA_PIECE_OUTPUT = 32 << 20  # a piece rebuilds at most this: applied well within a timeout


async def full_delta(  # noqa: PLR0917
    link: PrimaryLink, root: Path, progress: Progress, checksum: bool = False,
    quarantine: bool = False, on_progress: Callable[[Progress], None] | None = None,
    scope: set[bytes] | None = None,
) -> None:  # fmt: skip
    """The delta over the whole tree, or over the subtrees of ``scope`` only."""
    if scope is None:
        progress.kind = "full"
    ask = None if scope is None else sorted(os.fsdecode(p) for p in scope)
    reply, _ = await link.request(control.list_tree(ask))
    theirs: dict[str, list[int]] = reply.get("tree", {})
    ours = await trio.to_thread.run_sync(list_tree, root, scope)
    changed = [p for p, v in ours.items() if checksum or theirs.get(p) != v]
    removed = [p for p in theirs if p not in ours]
    doomed = [p for p in changed if p in theirs] + removed
    if quarantine and doomed:
        reply, _ = await link.request(control.quarantine(doomed))
        if reply.get("error"):
            # The peer could not put its diverging files aside: overwriting them would lose
            # the only copy of what it wrote during the split. Stop; the operator sees why.
            raise LinkLost(f"the peer could not quarantine its diverging files: {reply['error']}")
    progress.bytes_total = progress.bytes_done + sum(
        ours[p][1] for p in changed if stat.S_ISREG(ours[p][0])
    )
    for p in sorted(removed, key=lambda s: -s.count("/")):
        link.submit(Record(0, Op.UNLINK, os.fsencode(p), flags=REMOVE_ANY))
    last = time.monotonic()
    for p in sorted(changed, key=lambda s: (s.count("/"), s)):
        rel = os.fsencode(p)
        try:
            st = os.lstat(abs_path(root, rel))
        except OSError as e:
            # Gone meanwhile: its operation is in the stream. Otherwise: read again later.
            if not absent(e):
                progress.retry.add(rel)
            continue
        t = theirs.get(p)
        if t is not None and stat.S_IFMT(t[0]) != stat.S_IFMT(st.st_mode):
            link.submit(Record(0, Op.UNLINK, rel, flags=REMOVE_ANY))
            t = None
        try:
            if stat.S_ISREG(st.st_mode):
                await _send_file(link, root, rel, st, None if t is None else t[1], progress)
                send_meta_now(link, root, rel, st)
            else:
                await reconcile(link, root, rel, st, DirtyState(), progress)
        except OSError as e:
            # Rotated, removed or replaced while its delta was made: ``settle`` reconciles
            # it where it is now (its rename, if any, is among the changes noted).
            log.info("resync: %r changed meanwhile (%s): reconciled again", rel, e)
            progress.retry.add(rel)
        progress.files_done += 1
        if on_progress and time.monotonic() - last >= 1:
            last = time.monotonic()
            on_progress(progress)


async def _send_file(  # noqa: PLR0917
    link: PrimaryLink, root: Path, rel: bytes, st: os.stat_result, their_size: int | None,
    progress: Progress,
) -> None:  # fmt: skip
    """The file as a delta against the secondary's copy of ``their_size`` bytes (None: it
    has none), whole if small."""
    path = abs_path(root, rel)
    if their_size is None or st.st_size <= SMALL_FILE:
        # read and queue with no checkpoint in between (ordering with live writes)
        link.submit(Record(0, Op.CREATE, rel, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid))
        if st.st_size <= SMALL_FILE:
            data = read_small(path)
            link.submit(Record(0, Op.REPLACE, rel, data=data))
            progress.bytes_done += len(data)
        else:
            link.submit(Record(0, Op.TRUNCATE, rel, offset=0))
            await send_ranges(link, root, rel, [(0, 1 << 62)], progress)
        return
    # The secondary's signature and our own block hashes at the same block size at once:
    # the delta then matches data changed in place without hashing (1 GiB: ~0.7 s).
    bs = D.block_size_for(their_size)
    ours: list[bytes] = []

    async def hash_ours() -> None:
        with contextlib.suppress(OSError):  # gone meanwhile: the delta finds out
            ours.append(await trio.to_thread.run_sync(D.block_hashes_file, path, bs, their_size))

    async with trio.open_nursery() as n:
        n.start_soon(hash_ours)
        reply, sig_bytes = await link.request(control.signature(os.fsdecode(rel)))
    if "error" in reply:
        await send_ranges(link, root, rel, [(0, st.st_size)], progress)
        return
    sig = D.Signature.decode(sig_bytes)
    known = ours[0] if ours and sig.block_size == bs else None
    d = await trio.to_thread.run_sync(D.delta_file, sig, path, known)
    # Live writes may land between pieces (and on the old file): they are among the changes
    # noted meanwhile, and ``settle`` sends them again.
    # In place (data changed where it lay), the secondary writes only the literals over its
    # file: a piece costs it no more than its own size, and it rewrites no 1 GiB beside.
    in_place = D.in_place(d)
    pieces = list(D.split(d, DELTA_PIECE, (1 << 62) if in_place else DELTA_PIECE_OUTPUT))
    out = 0
    sent: list[int] = []
    for i, piece in enumerate(pieces):
        await room(link, progress)
        # A piece costs the secondary up to 32 MiB of rebuilding for maybe a few KiB on the
        # wire, which the byte window does not see: at most two pieces ahead of the one it
        # rebuilds, so its keepalive answers stay within the timeout.
        if len(sent) >= 2:
            await link.wait_progress(lambda: link.stats().received_seq >= sent[-2])
        if not same_or_longer(path, st):
            # Renamed, replaced or cut shorter since the peer signed it (at the same stream
            # position as our stat): the rest of the delta would land on another file or
            # copy past the end of the peer's. Read again by ``settle``, whole.
            log.info("resync: %r changed during its delta: done again", rel)
            progress.retry.add(rel)
            return
        flags = (DELTA_CONT if i else 0) | (DELTA_MORE if i < len(pieces) - 1 else 0)
        flags |= DELTA_IN_PLACE if in_place else 0
        sent.append(
            link.submit(Record(0, Op.DELTA, rel, offset=out, flags=flags, data=piece.encode()))
        )
        link.ping()  # answered once the piece is rebuilt: its receipt ack
        out += piece.length
        progress.bytes_done += piece.length
