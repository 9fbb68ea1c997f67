"""``Primary``: the primary of one replicated directory. It mounts the file system
(``primary.fs``) over the backing directory with itself as the sink (``primary.sink``),
connects to the secondary again and again (``connect_loop``), and in each session says
HELLO, resyncs (``resync``) and declares the secondary in sync. Also: drain on stop,
verify, the manager's generation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from ha_runtime.generation import Generation, Relation, compare
from ha_runtime.replication import control, resync, tree
from ha_runtime.replication.activitylog import AL_IDLE_S, ActivityLog, merge_peer, plan_from_wire
from ha_runtime.replication.context import ReplicaContext, VerifyReport
from ha_runtime.replication.dirtylog import DirtyLog
from ha_runtime.replication.journal import Op, Record, valid_path
from ha_runtime.replication.link.framing import LinkLost
from ha_runtime.replication.link.primary import PrimaryLink, backoff
from ha_runtime.replication.link.tls import client_context, connect
from ha_runtime.replication.primary import fs
from ha_runtime.replication.primary.sink import PrimarySink
from ha_runtime.replication.resync.progress import Progress

log = logging.getLogger("hapair.replication")


# A connection attempt refused within this (the peer's host answered) is retried this soon.
QUICK_REFUSAL_S = 0.2
# A session shorter than this counts as failed for the reconnection backoff.
STABLE_SESSION_S = 10.0
# Incremental resyncs the secondary refused in a row before the next one is full: a
# difference the dirty log cannot repair must not leave the pair unprotected for good.
FALLBACK_FULL_AFTER = 3


class Primary(PrimarySink):
    def __init__(
        self, ctx: ReplicaContext, fence: Callable[[str, str | None], None] | None = None
    ) -> None:
        super().__init__(ctx, fence)
        self.generation: str | None = None  # the manager's current generation
        self._resync_request: tuple[bool, bool] | None = None
        self._drained: int | None = None  # seq of the drain barrier the peer acked
        self._refused_incremental = 0  # incremental resyncs in a row the peer refused

    def request_resync(self, full: bool = False, quarantine: bool = False) -> None:
        """Primary: resync the peer (again), incrementally or fully (delta over the tree)."""
        self._resync_request = (full, quarantine)
        if self.link is not None:
            self.link.fail("resync requested")

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        layout = self.ctx.layout
        self.ctx.status.role = "primary"
        self.ctx.status.state = "alone"
        layout.backing.mkdir(parents=True, exist_ok=True)
        layout.app_dir.mkdir(parents=True, exist_ok=True)
        first = not layout.dirty.exists()
        self.dirty = DirtyLog(layout.dirty)
        self.dirty.open()
        if first and self.ctx.read_synced() is None:
            self.dirty.mark_lost()  # never synced: the peer's copy is unknown
            self.dirty.sync()
        self.activity = ActivityLog(layout.activity)
        self.activity.open()
        # Left hot by a past run that ended in sync without draining: the peer may lack it.
        hot = self.activity.entries()
        if self.activity.fold_into(self.dirty):
            self.ctx.emit("activity_log_folded", entries=hot)
        self.ctx.status.rejected = dict(self.dirty.rejected)
        try:
            async with trio.open_nursery() as n:
                await n.start(
                    lambda task_status: fs.serve(
                        backing=layout.backing, mountpoint=layout.app_dir, sink=self,
                        fsname=f"hapair-{self.ctx.module.name}", task_status=task_status,
                    )
                )  # fmt: skip
                task_status.started()
                n.start_soon(self._trim_activity)
                await self.connect_loop()
        finally:
            self.dirty.close()
            self.activity.close()
            link = self.link
            if self._drained is not None and (link is None or link.seq == self._drained):
                # The peer holds everything: no dirty log means "nothing the peer lacks".
                layout.dirty.unlink(missing_ok=True)
                layout.activity.unlink(missing_ok=True)

    async def _trim_activity(self) -> None:
        """In sync: now and then drop from the activity log what the peer acknowledged and
        nobody used lately, so a crash leaves only recent activity to resync."""
        while True:
            await trio.sleep(AL_IDLE_S / 2)
            link, al = self.link, self.activity
            if self.ctx.status.state == "sync" and link is not None and al is not None:
                try:
                    await trio.to_thread.run_sync(al.trim, link.durable_seq)
                except OSError as e:
                    # The file keeps entries the peer has (more to resync after a crash,
                    # never less); a full disk must not take replication down.
                    log.warning("replication: cannot trim the activity log: %s", e)

    def _addresses(self) -> list[tuple[str, int]]:
        spec = self.ctx.cluster.peer(self.ctx.peer)
        nets = [n for n in self.ctx.settings.networks if n in spec.addresses]
        nets += [n for n in sorted(spec.addresses) if n not in nets]
        return [(spec.addresses[n], self.ctx.settings.port) for n in nets]

    async def connect_loop(self) -> None:
        ctx = client_context(self.ctx.tls)
        attempt = 0
        refused: list[str] = []

        def on_refused(m: str) -> None:
            refused.append(m)
            self.ctx.emit("link_refused", reason=m)

        while True:
            refused.clear()
            t0 = trio.current_time()
            try:
                conn = await connect(
                    addresses=self._addresses(), peer=self.ctx.peer, ctx=ctx, key=self.ctx.key,
                    timeout=self.ctx.settings.timeout_s, on_refused=on_refused,
                    accepted=self.ctx.accepted,
                )  # fmt: skip
            except LinkLost as e:
                self.ctx.status.last_error = str(e)
                if not refused and trio.current_time() - t0 < QUICK_REFUSAL_S:
                    # Refused at once: the peer's host is up and its replica is not listening
                    # yet (a node booting): it will be soon, and the resync waits on it (the
                    # backoff made the peer wait up to 2 s more). A TLS refusal backs off.
                    await trio.sleep(QUICK_REFUSAL_S)
                else:
                    await trio.sleep(backoff(attempt))
                    attempt += 1
                continue
            t_session = trio.current_time()
            settings = self.ctx.settings
            link = PrimaryLink(
                conn, timeout=settings.timeout_s, durable=settings.ack == "durable",
                max_inflight=settings.max_inflight_bytes, on_rejected=self.ctx.rejected,
            )  # fmt: skip
            async with trio.open_nursery() as n:
                n.start_soon(link.run)
                try:
                    await self._session(link)
                    await link.wait_lost()
                except LinkLost:
                    pass
                except trio.TooSlowError:
                    # a resync waited a whole timeout for room without any acknowledgement
                    link.fail(f"no acknowledgement within {link.timeout:g} s (resync)")
                except Exception as e:
                    # Never an exit of this child (it would unmount the application's
                    # directory under it): a link failure, reconnected with backoff.
                    log.exception("replication %s: session failed", self.ctx.module.name)
                    self.ctx.status.session_errors += 1
                    link.fail(f"session error: {type(e).__name__}: {e}")
                n.cancel_scope.cancel()
            lasted = trio.current_time() - t_session
            self._count_refused_incremental(link)
            await self.go_alone(link.lost_reason or "link closed")
            self.link = None
            # A secondary that fails every session within moments (its disk full: a short
            # resync reaches sync, the next write fails) must not be reconnected to in a
            # tight loop: back off until a session lasts.
            attempt = 0 if lasted >= STABLE_SESSION_S else attempt + 1
            await trio.sleep(backoff(attempt))

    def _count_refused_incremental(self, link: PrimaryLink) -> None:
        """After a session: an incremental resync the secondary refused (it sent an error:
        a record it could not apply) counts; FALLBACK_FULL_AFTER of them in a row make the
        next resync full, loudly. A link lost otherwise (network) does not count."""
        assert self.dirty is not None
        if self.progress is None:  # the resync completed (or none started)
            self._refused_incremental = 0
            return
        # (Not the state: "sync" begins with the final barrier, before the peer applied it.)
        refused = (link.lost_reason or "").startswith("secondary error")
        if self.dirty.state.lost or not refused:
            return
        self._refused_incremental += 1
        if self._refused_incremental < FALLBACK_FULL_AFTER:
            return
        self._refused_incremental = 0
        _, quarantine = self._resync_request or (False, False)
        self._resync_request = (True, quarantine)
        log.warning(
            "replication %s: %d incremental resyncs in a row refused by the peer (last: %s);"
            " the next one is full",
            self.ctx.module.name, FALLBACK_FULL_AFTER, link.lost_reason,
        )  # fmt: skip
        self.ctx.emit("resync_fallback_full", attempts=FALLBACK_FULL_AFTER, reason=link.lost_reason)

    async def _session(self, link: PrimaryLink) -> None:
        assert self.dirty is not None
        hello, _ = await link.request(control.hello(self.ctx.module.name, self.ctx.cluster.node))
        if hello.get("error"):
            raise LinkLost(str(hello["error"]))
        # A secondary that reads version 3 frames says so; an older one does not answer it.
        link.untagged = hello.get("untagged") is True
        self.ctx.status.link = "connected"
        self.ctx.emit("peer_connected", address=link.conn.peer)
        full, quarantine = self._resync_request or (False, False)
        self._resync_request = None
        # From here on, what the application changes while the resync works is gathered
        # too (resync.settle reconciles it): the snapshot and the watch start together.
        state = self.dirty.snapshot(watch=True)
        why = self._resync_kind(hello)
        if why is not None:
            full = True
            quarantine = quarantine or why.startswith(("split brain", "first"))
            self.ctx.emit("resync_full_needed", reason=why, quarantine=quarantine)
        full = full or state.lost
        detail: dict[str, Any] = {}
        if not full and hello.get("dirty"):
            # The peer was primary since it was last in sync: what it may have changed
            # that we never got is in its activity log (checked by _resync_kind).
            peer, _ = plan_from_wire(hello.get("activity"), valid_path)
            assert peer is not None
            merge_peer(state, peer)
            detail["peer_activity"] = {
                "ranges": sum(len(r) for r in peer.ranges.values()),
                "paths": len(peer.touched | peer.scope),
            }
        self.link = link
        self.ctx.status.state = "resyncing"  # live writes: noted dirty and shipped
        # A secondary that applies BATCH records says so: the resync's small ones go packed.
        self.progress = Progress(batch=hello.get("batch") is True)
        self.ctx.emit("resync_started", full=full, **detail)
        if full:
            # The log now says "full needed" until the end; live writes are noted too.
            self.dirty.clear()
            self.dirty.mark_lost()
            await trio.to_thread.run_sync(self.dirty.sync)
        try:
            await resync.run(link, self.ctx.layout.backing, state, self.progress, full=full,
                             changes=self.dirty.take_watch, quarantine=quarantine,
                             on_progress=self._on_progress)  # fmt: skip
        finally:
            self.dirty.end_watch()
        # Everything the activity log held is in the dirty log or on the peer: start afresh
        # (the dirty log keeps covering what goes before the final barrier).
        assert self.activity is not None
        await trio.to_thread.run_sync(self.activity.clear)
        # Switch to synchronous replication atomically with the final barrier.
        seq = link.submit(Record(0, Op.FSYNC, b""))
        self.ctx.status.state = "sync"
        queued = time.monotonic()
        await link.wait_acked(seq, timeout=max(self.ctx.settings.timeout_s, 60.0))
        barrier = time.monotonic()
        await trio.to_thread.run_sync(self.dirty.clear)
        done = self.progress.as_dict()
        self.progress = None
        await self._declare_in_sync(link)
        # Where the end of a resync goes: the peer's final barrier, then our bookkeeping
        # and the in-sync declaration's round trip.
        done["barrier_s"] = round(barrier - queued, 3)
        done["declare_s"] = round(time.monotonic() - barrier, 3)
        self.ctx.emit("resync_done", **done)

    def _resync_kind(self, hello: dict[str, Any]) -> str | None:
        """Why the peer needs a full (checksum delta) resync; None: our dirty log covers it.

        The dirty log holds what changed since both copies were identical at ``synced``;
        it is enough only if the peer's copy is that same copy, untouched since."""
        local = self.ctx.generations.load().generation
        peer = _parse_gen(hello.get("generation"))
        if peer is None:
            return "the peer did not tell its data generation"
        rel = compare(local, peer)
        if rel in (Relation.DIVERGED, Relation.PEER_NEWER):
            return f"split brain: the peer's copy changed apart from ours ({rel.value})"
        if peer.empty:
            return "first synchronisation of the peer's copy"
        if hello.get("dirty"):
            _, problem = plan_from_wire(hello.get("activity"), valid_path)
            if problem:
                return f"the peer was primary since it was last in sync and {problem}"
        ours = self.ctx.read_synced()
        if ours is None or hello.get("synced") != ours:
            return "the two copies were not last identical at the same generation"
        return None

    async def _declare_in_sync(self, link: PrimaryLink) -> None:
        """Tell the secondary it is in sync at our current generation (in stream order)."""
        gen = self.generation or f"{self.ctx.generations.load().generation.current:016x}"
        await trio.to_thread.run_sync(self.ctx.write_synced, gen)
        # From here the peer may adopt `gen`: losing the link again needs a new fence, and
        # the answer to a round asked before no longer covers it (its waiters stay waiting).
        self.ctx.status.synced_generation = gen
        self.fence_needed = True
        self.fence_token = None
        await link.request(control.in_sync(gen))
        # The peer has everything up to the final barrier: what waited for a fence is on it.
        self.release_fenced()

    async def set_generation(self, gen: str) -> None:
        """Primary: the manager's generation changed; re-declare sync under the new label."""
        self.generation = gen
        link = self.link
        if self.ctx.status.state == "sync" and link is not None and not link.lost_reason:
            try:
                await self._declare_in_sync(link)
            except LinkLost as e:
                await self.go_alone(str(e))

    async def drain(self, timeout: float) -> bool:
        """Primary stopping (application already stopped): wait until the peer has made
        everything durable. True: the copies are identical, the dirty log is dropped."""
        link = self.link
        if link is None or self.ctx.status.state != "sync" or link.lost_reason:
            return False
        seq = link.submit(Record(0, Op.FSYNC, b""))
        try:
            await link.wait_acked(seq, timeout=timeout)
            await self._declare_in_sync(link)
        except LinkLost as e:
            await self.go_alone(str(e))
            return False
        self._drained = seq
        return True

    def _on_progress(self, p: Progress) -> None:
        self.ctx.emit("resync_progress", **p.as_dict())

    async def verify(self) -> VerifyReport:
        link = self.link
        if link is None or self.ctx.status.state != "sync":
            raise LinkLost("not in sync with the peer")
        seq = link.submit(Record(0, Op.FSYNC, b""))
        await link.wait_acked(seq)
        # First pass with the application running: the secondary digests its copy at this
        # journal position, the primary its own a little later, so a file written meanwhile
        # may differ without being different.
        theirs_reply, _ = await link.request(control.digest())
        ours = await trio.to_thread.run_sync(tree.tree_digests, self.ctx.layout.backing)
        theirs = theirs_reply.get("digests", {})
        diffs = tree.compare(ours, theirs)
        if not diffs:
            return VerifyReport(True, len(ours), [])
        # Final comparison of those paths only, at one journal position: mutating operations
        # wait (a short quiesce, a few files), a barrier drains the journal, both digest.
        paths = sorted({p for p in set(ours) | set(theirs) if ours.get(p) != theirs.get(p)})
        self.paused = trio.Event()
        try:
            seq = link.submit(Record(0, Op.FSYNC, b""))
            await link.wait_acked(seq)
            theirs_reply, _ = await link.request(control.digest(paths))
            mine = await trio.to_thread.run_sync(tree.digests_of, self.ctx.layout.backing, paths)
        finally:
            paused, self.paused = self.paused, None
            paused.set()
        diffs = tree.compare(mine, theirs_reply.get("digests", {}))
        return VerifyReport(not diffs, len(ours), diffs)


def _parse_gen(raw: Any) -> Generation | None:
    try:
        return Generation(int(raw["current"], 16), tuple(int(h, 16) for h in raw["history"]))
    except (KeyError, TypeError, ValueError):
        return None
