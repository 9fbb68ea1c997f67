"""Resynchronisation of a returning secondary (``run``): a full or incremental pass, then
``settle``.

- **Incremental** (``incremental``): the primary replays the recorded renames, then for each
  recorded path reconciles existence, type, metadata and size and sends exactly the dirty
  byte ranges, read from the backing file at send time. Live writes keep flowing on the same
  ordered stream meanwhile: a chunk is read and queued with no scheduling point in between,
  so a later live write to the same bytes always lands after it.
- **Full** (``full_delta``): when the divergence is unknown, the secondary lists its tree; every
  primary file whose size or mtime differs (or every file, with ``checksum=True``) travels as
  an rsync delta against the secondary's copy (signature requested from the secondary);
  paths the primary does not have are removed. With ``quarantine=True`` (split brain) the
  secondary first moves every file it is about to change or remove into its quarantine.
- **Settle** (``settle``): what the application changed while a pass held it back.
- ``progress``: what the pass has yet to reconcile (live operations on it are held back,
  ``hold``); ``send``: the pieces every pass sends with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ha_runtime.replication.dirtylog import DirtyState
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.resync.full import full_delta
from ha_runtime.replication.resync.incremental import incremental
from ha_runtime.replication.resync.progress import Progress, pend_all
from ha_runtime.replication.resync.settle import settle


async def run(
    link: PrimaryLink, root: Path, state: DirtyState, progress: Progress, *, full: bool,
    changes: Callable[[], DirtyState], quarantine: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> None:  # fmt: skip
    """A resync: the full checksum delta or the incremental pass over ``state``, then
    ``settle`` over what the application changed that the pass held back. ``changes()``
    returns what was noted since the previous call (the first: since ``state`` was
    taken)."""
    try:
        if full:
            progress.all_pending = True
            try:
                await full_delta(link, root, progress, checksum=True, quarantine=quarantine,
                                 on_progress=on_progress)  # fmt: skip
            finally:
                progress.all_pending = False
        else:
            await incremental(link, root, state, progress, on_progress)
        await settle(link, root, progress, changes, on_progress=on_progress)
    finally:
        pend_all(progress, ())
        progress.all_pending = False
        progress.held = {}
