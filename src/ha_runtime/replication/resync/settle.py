"""``settle``: reconcile what the application changed while a pass could not ship it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ha_runtime.replication.dirtylog import DirtyState
from ha_runtime.replication.link.framing import LinkLost
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.resync.incremental import reconcile_paths, resend
from ha_runtime.replication.resync.progress import Progress, ancestors, in_scope, pend_all
from ha_runtime.replication.resync.send import room

# Passes over what the application changed while the resync worked on it (see ``settle``):
# one that needs no delta ends it; past this many, the session is a link failure.
SETTLE_ROUNDS = 8


async def settle(
    link: PrimaryLink, root: Path, progress: Progress, changes: Callable[[], DirtyState], *,
    on_progress: Callable[[Progress], None] | None = None,
) -> None:  # fmt: skip
    """Reconcile what the application changed while the pass could not ship it.

    The application's operations on paths the pass had yet to reconcile were held back
    (``hold``): the peer might lack them, and a delta is not atomic (the file is read, the
    pieces travel later). Those the pass reconciled afterwards were read as they were then;
    the others (``leftover``), and paths that could not be read (``retry``), are reconciled
    here from the changes noted meanwhile: names renamed, linked or changed in type are
    sent again whole (``resend``: whatever the peer holds there goes; no delta, whose
    listing and signatures would keep them held back long enough for a busy application
    to touch them again, round after round), the rest as an incremental pass does.
    Operations shipped live followed the peer's copy in order, and need nothing more. Until
    a round leaves nothing behind; past SETTLE_ROUNDS, a link failure (the session starts
    over)."""
    for _ in range(SETTLE_ROUNDS):
        live = changes()
        retry, held = progress.retry, progress.leftover | progress.retry
        progress.retry = set()
        progress.leftover = set()
        if not held:
            return
        moved = {p for p in live.scope if p in held}
        for src, dst in live.renames:
            if src in held or dst in held:
                moved |= {src, dst}
        # sent again whole: moved names, what could not be read or whose delta was left
        whole = moved | retry | _unnoted(held, live)
        whole = {p for p in whole if not any(in_scope(a, whole) for a in ancestors(p))}
        work = DirtyState(touched={p for p in held if not in_scope(p, whole)})
        work.ranges = {p: r for p, r in live.ranges.items() if p in work.touched}
        pend_all(progress, work.touched | whole)
        await reconcile_paths(link, root, work, progress, on_progress)
        for rel in sorted(whole, key=lambda p: (p.count(b"/"), p)):
            await room(link, progress)
            await resend(link, root, rel, progress)
    reason = (
        f"resync: the application kept renaming or the tree kept failing to read after "
        f"{SETTLE_ROUNDS} rounds ({sorted(progress.retry | progress.leftover)[:5]!r})"
    )
    link.fail(reason)  # a link failure: the session starts over after a backoff
    raise LinkLost(reason)


def _unnoted(held: set[bytes], live: DirtyState) -> set[bytes]:
    """Held paths with no change noted for them (a path that could not be read, or whose
    delta was abandoned): a checksum delta reads them again whole."""
    return {p for p in held if p not in live.touched and p not in live.ranges}
