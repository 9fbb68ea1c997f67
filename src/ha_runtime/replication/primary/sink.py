"""``PrimarySink``: what the primary's file system (``primary.fs``) calls around every
operation (contract: docs/replication.md). ``before`` records what the operation may change,
durably (activity log in sync, dirty log otherwise); ``after`` ships it on the link;
``barrier`` (an fsync) returns once the peer acknowledged, or, without the peer, once the
daemon fenced the peer off its old copy. Losing the link (``go_alone``) moves what the peer
may lack into the dirty log.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable

import trio

from ha_runtime.metrics import LatencyHistogram
from ha_runtime.replication.activitylog import ActivityLog
from ha_runtime.replication.context import ReplicaContext, ReplicationStatus
from ha_runtime.replication.dirtylog import DirtyLog
from ha_runtime.replication.journal import Op, Record
from ha_runtime.replication.link.framing import LinkLost
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.primary.fs import fsync_backing
from ha_runtime.replication.resync.progress import Progress, hold

log = logging.getLogger("hapair.replication")


# A barrier with at most this much written since the previous one fsyncs the local file in
# the event loop (a short fdatasync); above it, in a thread.
INLINE_FSYNC_BYTES = 1 << 20
# After such a barrier's local fsync, the peer's acknowledgement is usually a fraction of a
# millisecond away (it fsyncs at the same time): it is read in the barrier's own task for up
# to this long (``PrimaryLink.collect_acks``), the event loop held as for the fsync, before
# the barrier parks and the receiving task takes over.
INLINE_ACK_WAIT_S = 0.002


class PrimarySink:
    def __init__(
        self, ctx: ReplicaContext, fence: Callable[[str, str | None], None] | None = None
    ) -> None:
        self.ctx = ctx
        # Set by the connect loop (``primary.service``) while a session runs; the logs while
        # the primary runs; the resync's progress while one runs.
        self.link: PrimaryLink | None = None
        self.dirty: DirtyLog | None = None
        self.activity: ActivityLog | None = None
        self.progress: Progress | None = None
        self._noted: set[int] = set()
        # verify(): while set, mutating operations wait (the final comparison's quiesce).
        self.paused: trio.Event | None = None
        self._barriers = 0  # barriers waiting for the peer
        self._written = 0  # bytes written since the last barrier
        # Fencing (docs/replication.md, acknowledgement rule): an fsync that returns without
        # the peer's acknowledgement waits until the daemon answers `fence(token, declared)`
        # with `fenced(token)`: the module is in a data generation the peer's copy never
        # held and the peer can no longer take over on its old copy unknowingly. Needed from
        # the start (what the peer holds is unknown) and again once an `in_sync` declaration
        # let the peer adopt our generation. None: no daemon to ask (tests, tools).
        self.fence = fence
        self.fence_needed = True
        self.fence_token: str | None = None
        self._fence_done = trio.Event()
        self._ack_latency = LatencyHistogram()

    def report(self, s: ReplicationStatus) -> None:
        """Fill the primary's figures into the status."""
        if self.link is not None:
            st = self.link.stats()
            s.last_seq, s.acked_seq, s.inflight_bytes = (
                st.last_seq,
                st.durable_seq,
                st.inflight_bytes,
            )
        if self.dirty is not None:
            s.dirty_bytes = self.dirty.state.dirty_bytes()
            s.dirty_paths = len(self.dirty.state.ranges) + len(self.dirty.state.touched)
        s.resync = self.progress.as_dict() if self.progress else None
        s.ack_latency = self._ack_latency.as_dict() if self._ack_latency.count else None

    # -- the Sink the FUSE layer calls

    async def before(self, rec: Record) -> None:
        """Record what ``rec`` may change, durably, before the FUSE layer performs it: in the
        activity log while in sync with a live link, in the dirty log otherwise (ALONE,
        resyncing, or the link already lost while the state still says sync)."""
        while self.paused is not None:
            await self.paused.wait()
        link = self.link
        if (
            self.ctx.status.state == "sync"
            and link is not None
            and not link.lost_reason
            and await self._note_active(link, rec)
        ):
            return
        await self._note_dirty(rec)
        if self.ctx.status.state == "resyncing" and link is not None and not link.lost_reason:
            # Shipped too (unless the resync holds it back): room on the link as in sync.
            # Without it an application fsyncing as fast as answered queued hundreds of MiB,
            # a keepalive's answer came later than the timeout, and the resync started over.
            try:
                await link.room()
            except trio.TooSlowError:
                link.fail(f"no acknowledgement within {link.timeout:g} s (queue full)")
            except LinkLost:
                pass  # recorded in the dirty log: nothing to ship

    async def _note_active(self, link: PrimaryLink, rec: Record) -> bool:
        """In sync: what the operation may change is hot in the activity log (durably)
        before it is performed; only a new entry costs a record and an fsync. False when
        the link was lost meanwhile: the record will not travel, the dirty log must hold it."""
        al = self.activity
        assert al is not None
        pos = al.note(rec, link.durable_seq)
        try:
            if pos:
                await trio.to_thread.run_sync(al.sync, pos)
            await link.room()
        except trio.TooSlowError:
            link.fail(f"no acknowledgement within {link.timeout:g} s (queue full)")
        except LinkLost:
            pass
        finally:
            # No checkpoint from here to after(): the record will be link.seq + 1.
            al.release(rec, link.seq + 1)
        return not link.lost_reason

    async def _note_dirty(self, rec: Record) -> None:
        assert self.dirty is not None
        pos = self.dirty.note(rec, lambda: self._size_of(rec))
        self._noted.add(id(rec))
        try:
            if pos:
                await trio.to_thread.run_sync(self.dirty.sync, pos)
        except BaseException:
            # Not performed (its caller gets the error): an id may be reused by a later record.
            self._noted.discard(id(rec))
            raise

    def _size_of(self, rec: Record) -> int | None:
        """The backing file's size before a write (lets the dirty log record appends ahead)."""
        try:
            return os.stat(self.ctx.layout.backing_bytes + b"/" + rec.path).st_size
        except OSError:
            return None

    def after(self, rec: Record) -> None:
        noted = id(rec) in self._noted
        self._noted.discard(id(rec))
        link = self.link
        if (
            link is not None
            and not link.lost_reason
            and self.ctx.status.state in ("sync", "resyncing")
        ):
            progress = self.progress if self.ctx.status.state == "resyncing" else None
            if progress is not None and hold(progress, rec):
                return  # in the dirty log; the resync reconciles its path later
            link.submit(rec)
            self._written += len(rec.data)
        elif not noted and self.dirty is not None:
            # Lost between before() and after(): the operation is performed and will not
            # travel. Durable before it returns to the application (its activity log entry
            # is emptied by the next resync): an fsync in the loop, on this rare path only.
            pos = self.dirty.note(rec, lambda: self._size_of(rec))
            if pos:
                self.dirty.sync(pos)

    async def barrier(self, path: bytes, datasync: bool) -> None:
        async def local() -> None:
            await trio.to_thread.run_sync(self._fsync_local, path, datasync)

        link = self.link
        if self.ctx.status.state == "sync" and link is not None and not link.lost_reason:
            sent = time.monotonic()
            seq = link.submit(Record(0, Op.FSYNC, path, flags=int(datasync)), flushed=True)
            self._barriers += 1
            try:
                # On its way from this task: the sender does not wake for it (nor for the
                # write before it, which travels in the same send).
                await link.flush()
                small, self._written = self._written <= INLINE_FSYNC_BYTES, 0
                if self._barriers == 1 and small:
                    # The only barrier in progress, little written since the last one: fsync
                    # here while the peer does, without two thread hops (18 % of the CPU of
                    # a 4 KiB write + fdatasync). A longer fsync would stall every operation
                    # and the link's keepalives: in a thread.
                    self._fsync_local(path, datasync)
                    await self._wait_acked(link, seq, sent, inline_s=INLINE_ACK_WAIT_S)
                else:
                    async with trio.open_nursery() as n:
                        n.start_soon(local)
                        await self._wait_acked(link, seq, sent)
            finally:
                self._barriers -= 1
        else:
            await local()
            assert self.dirty is not None
            await trio.to_thread.run_sync(self.dirty.sync)
            await self.wait_fenced()

    async def _wait_acked(
        self, link: PrimaryLink, seq: int, sent: float, inline_s: float = 0.0
    ) -> None:
        """``inline_s``: first read the ack in this task for up to that long
        (``PrimaryLink.collect_acks``), then park if it is not in."""
        try:
            if not (inline_s and link.collect_acks(seq, inline_s)):
                await link.wait_acked(seq)
            self._ack_latency.observe(time.monotonic() - sent)
        except LinkLost as e:
            await self.go_alone(str(e))
            # Durable here, not acknowledged there: the peer must not be able to take over
            # on a copy without it before the application hears "done".
            await self.wait_fenced()

    def request_fence(self) -> None:
        if self.fence is None or not self.fence_needed or self.fence_token is not None:
            return
        self.fence_token = secrets.token_hex(8)
        self.ctx.emit("fence_requested", declared=self.ctx.status.synced_generation)
        self.fence(self.fence_token, self.ctx.status.synced_generation)

    async def wait_fenced(self) -> None:
        """Return once an acknowledgement without the peer is safe to give (at once if the
        peer was fenced off since it could last adopt our generation)."""
        if self.fence is None or not self.fence_needed:
            return
        done = self._fence_done
        self.request_fence()
        await done.wait()

    def fenced(self, token: str) -> None:
        """The daemon's answer to our fence request: the peer is fenced off its old copy."""
        if token != self.fence_token:
            return  # the answer to a round an in_sync declaration already closed
        self.fence_needed = False
        self.release_fenced()
        self.ctx.emit("fenced")

    def release_fenced(self) -> None:
        self.fence_token = None
        done, self._fence_done = self._fence_done, trio.Event()
        done.set()

    def _fsync_local(self, path: bytes, datasync: bool) -> None:
        fsync_backing(self.ctx.layout.backing_bytes, path, datasync)

    async def go_alone(self, reason: str) -> None:
        if self.ctx.status.state == "alone":
            self.request_fence()  # a round an in_sync declaration voided may have waiters
            return
        was = self.ctx.status.state
        self.ctx.status.state = "alone"
        self.ctx.status.link = "down"
        self.ctx.status.last_error = reason
        link, self.link = self.link, None
        assert self.dirty is not None
        if link is not None:
            for r in link.unacked():
                self.dirty.note(r)
        if self.activity is not None:
            self.activity.link_changed()
        await trio.to_thread.run_sync(self.dirty.sync)
        if was == "sync":
            self.ctx.emit("peer_lost", reason=reason)
        self.request_fence()  # start now: the daemon's wait runs while the barriers finish
