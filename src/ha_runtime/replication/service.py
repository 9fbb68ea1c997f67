"""``ReplicationService``: what the node daemon's manager uses (contract: docs/replication.md).

One service replicates one directory of a mirror module (``dir_index`` into
``replicated_dirs``): pyfuse3 serves a single mount per process, so the manager runs one
service per replicated directory, each primary in its own process.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import trio

from ha_runtime.config import ClusterConfig, ModuleConfig
from ha_runtime.generation import Generation, GenerationStore, Relation, atomic_write, compare
from ha_runtime.metrics import LatencyHistogram
from ha_runtime.replication import beneath, fusefs, quarantine, resync, tree
from ha_runtime.replication import delta as D
from ha_runtime.replication.activitylog import (
    AL_EXTENTS,
    AL_IDLE_S,
    ActivityLog,
    load_activity,
    merge_peer,
    plan_from_wire,
    plan_to_wire,
)
from ha_runtime.replication.applier import Applier
from ha_runtime.replication.dirtylog import DirtyLog
from ha_runtime.replication.journal import Op, Record, derive_key, valid_path
from ha_runtime.replication.link.framing import Conn, LinkLost
from ha_runtime.replication.link.primary import PrimaryLink, backoff
from ha_runtime.replication.link.secondary import SecondarySession
from ha_runtime.replication.link.tls import TlsFiles, client_context, connect, serve, server_context
from ha_runtime.replication.resync.progress import Progress, hold

log = logging.getLogger("hapair.replication")

# A connection attempt refused within this (the peer's host answered) is retried this soon.
QUICK_REFUSAL_S = 0.2
# A session shorter than this counts as failed for the reconnection backoff.
STABLE_SESSION_S = 10.0
# Incremental resyncs the secondary refused in a row before the next one is full: a
# difference the dirty log cannot repair must not leave the pair unprotected for good.
FALLBACK_FULL_AFTER = 3

# A barrier with at most this much written since the previous one fsyncs the local file in
# the event loop (a short fdatasync); above it, in a thread.
INLINE_FSYNC_BYTES = 1 << 20


@dataclass(frozen=True)
class ReplicationSettings:
    port: int = 7441
    ack: Literal["durable", "received"] = "durable"
    timeout_s: float = 3.0
    networks: tuple[str, ...] = ("hb", "lan")
    backing_root: Path | None = None  # default: cluster.state_dir / "replica"
    max_inflight_bytes: int = 64 << 20
    site_key: bytes | None = None  # default: read cluster.site_key
    al_extents: int = AL_EXTENTS  # activity log: hot entries kept once the peer acked them


@dataclass(frozen=True)
class Event:
    kind: str
    module: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReplicationStatus:
    role: str = "idle"
    state: str = "idle"  # sync | alone | resyncing | idle
    link: str = "down"
    address: str | None = None
    last_seq: int = 0
    acked_seq: int = 0
    inflight_bytes: int = 0
    dirty_bytes: int = 0
    dirty_paths: int = 0
    resync: dict[str, Any] | None = None
    # The generation the primary declared this copy in sync at (secondary: the manager adopts
    # the primary's generation only while this equals it).
    synced_generation: str | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    # Sessions ended by an unexpected error (each a link failure, reconnected with backoff).
    session_errors: int = 0
    ack_latency: dict[str, Any] | None = None  # primary: barrier ack times (metrics)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    equal: bool
    files: int
    differences: list[str]


class ReplicationService:
    def __init__(
        self,
        module: ModuleConfig,
        cluster: ClusterConfig,
        settings: ReplicationSettings | None = None,
        on_event: Callable[[Event], None] | None = None,
        dir_index: int = 0,
        *,
        fence: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.module = module
        self.cluster = cluster
        self.settings = settings or ReplicationSettings()
        self.on_event = on_event
        self.app_dir = module.replicated_dirs[dir_index]
        base = self.settings.backing_root or cluster.state_dir / "replica"
        self.backing = base / module.name / str(dir_index)
        self.dirty_path = base / f"{module.name}.{dir_index}.dirty"
        self.al_path = base / f"{module.name}.{dir_index}.al"
        self.quarantine_root = base / f"{module.name}.quarantine"
        # Generation at which both copies were last identical (written on both sides at the
        # end of a resync, and by a primary that drained cleanly on stop).
        self.synced_path = base / f"{module.name}.{dir_index}.synced"
        self.generations = GenerationStore(cluster.state_dir, module.name)
        self.generation: str | None = None  # primary: the manager's current generation
        self.peer = module.peer_of(cluster.node)
        key = self.settings.site_key
        if key is None:
            key = cluster.site_key.read_bytes().rstrip(b"\n")
        self.key = derive_key(key)
        self.tls = TlsFiles(cluster.tls.ca, cluster.tls.cert, cluster.tls.key)
        self._status = ReplicationStatus()
        self._dirty: DirtyLog | None = None
        self._al: ActivityLog | None = None
        self._link: PrimaryLink | None = None
        self._noted: set[int] = set()
        self._progress: Progress | None = None
        self._resync_request: tuple[bool, bool] | None = None
        self._kick = trio.Event()
        self._drained: int | None = None  # seq of the drain barrier the peer acked
        # verify(): while set, mutating operations wait (the final comparison's quiesce).
        self._paused: trio.Event | None = None
        self._barriers = 0  # barriers waiting for the peer
        self._written = 0  # bytes written since the last barrier
        self._refused_incremental = 0  # incremental resyncs in a row the peer refused
        # Fencing (docs/replication.md, acknowledgement rule): an fsync that returns without
        # the peer's acknowledgement waits until the daemon answers `fence(token, declared)`
        # with `fenced(token)`: the module is in a data generation the peer's copy never
        # held and the peer can no longer take over on its old copy unknowingly. Needed from
        # the start (what the peer holds is unknown) and again once an `in_sync` declaration
        # let the peer adopt our generation. None: no daemon to ask (tests, tools).
        self.fence = fence
        self._fence_needed = True
        self._fence_token: str | None = None
        self._fence_done = trio.Event()
        self._ack_latency = LatencyHistogram()

    # -- events and status
    def _emit(self, kind: str, /, **detail: Any) -> None:
        log.info("replication %s: %s %s", self.module.name, kind, detail)
        if self.on_event:
            self.on_event(Event(kind, self.module.name, detail))

    def status(self) -> ReplicationStatus:
        s = self._status
        if self._link is not None:
            st = self._link.stats()
            s.last_seq, s.acked_seq, s.inflight_bytes = (
                st.last_seq,
                st.durable_seq,
                st.inflight_bytes,
            )
        if self._dirty is not None:
            s.dirty_bytes = self._dirty.state.dirty_bytes()
            s.dirty_paths = len(self._dirty.state.ranges) + len(self._dirty.state.touched)
        s.resync = self._progress.as_dict() if self._progress else None
        s.ack_latency = self._ack_latency.as_dict() if self._ack_latency.count else None
        return s

    def request_resync(self, full: bool = False, quarantine: bool = False) -> None:
        """Primary: resync the peer (again), incrementally or fully (delta over the tree)."""
        self._resync_request = (full, quarantine)
        if self._link is not None:
            self._link.fail("resync requested")

    # -- the Sink the FUSE layer calls (primary)
    async def before(self, rec: Record) -> None:
        """Record what ``rec`` may change, durably, before the FUSE layer performs it: in the
        activity log while in sync with a live link, in the dirty log otherwise (ALONE,
        resyncing, or the link already lost while the state still says sync)."""
        while self._paused is not None:
            await self._paused.wait()
        link = self._link
        if (
            self._status.state == "sync"
            and link is not None
            and not link.lost_reason
            and await self._note_active(link, rec)
        ):
            return
        await self._note_dirty(rec)
        if self._status.state == "resyncing" and link is not None and not link.lost_reason:
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
        al = self._al
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
        assert self._dirty is not None
        pos = self._dirty.note(rec, lambda: self._size_of(rec))
        self._noted.add(id(rec))
        try:
            if pos:
                await trio.to_thread.run_sync(self._dirty.sync, pos)
        except BaseException:
            # Not performed (its caller gets the error): an id may be reused by a later record.
            self._noted.discard(id(rec))
            raise

    def _size_of(self, rec: Record) -> int | None:
        """The backing file's size before a write (lets the dirty log record appends ahead)."""
        try:
            return os.stat(os.fsencode(self.backing) + b"/" + rec.path).st_size
        except OSError:
            return None

    def after(self, rec: Record) -> None:
        noted = id(rec) in self._noted
        self._noted.discard(id(rec))
        link = self._link
        if (
            link is not None
            and not link.lost_reason
            and self._status.state in ("sync", "resyncing")
        ):
            progress = self._progress if self._status.state == "resyncing" else None
            if progress is not None and hold(progress, rec):
                return  # in the dirty log; the resync reconciles its path later
            link.submit(rec)
            self._written += len(rec.data)
        elif not noted and self._dirty is not None:
            # Lost between before() and after(): the operation is performed and will not
            # travel. Durable before it returns to the application (its activity log entry
            # is emptied by the next resync): an fsync in the loop, on this rare path only.
            pos = self._dirty.note(rec, lambda: self._size_of(rec))
            if pos:
                self._dirty.sync(pos)

    async def barrier(self, path: bytes, datasync: bool) -> None:
        async def local() -> None:
            await trio.to_thread.run_sync(self._fsync_local, path, datasync)

        link = self._link
        if self._status.state == "sync" and link is not None and not link.lost_reason:
            sent = time.monotonic()
            seq = link.submit(Record(0, Op.FSYNC, path, flags=int(datasync)))
            self._barriers += 1
            try:
                small, self._written = self._written <= INLINE_FSYNC_BYTES, 0
                if self._barriers == 1 and small:
                    # The only barrier in progress, little written since the last one: once
                    # it is on its way, fsync here while the peer does, without two thread
                    # hops (18 % of the CPU of a 4 KiB write + fdatasync). A longer fsync
                    # would stall every operation and the link's keepalives: in a thread.
                    await link.flush()
                    self._fsync_local(path, datasync)
                    await self._wait_acked(link, seq, sent)
                else:
                    async with trio.open_nursery() as n:
                        n.start_soon(local)
                        await self._wait_acked(link, seq, sent)
            finally:
                self._barriers -= 1
        else:
            await local()
            assert self._dirty is not None
            await trio.to_thread.run_sync(self._dirty.sync)
            await self._fenced()

    async def _wait_acked(self, link: PrimaryLink, seq: int, sent: float) -> None:
        try:
            await link.wait_acked(seq)
            self._ack_latency.observe(time.monotonic() - sent)
        except LinkLost as e:
            await self._go_alone(str(e))
            # Durable here, not acknowledged there: the peer must not be able to take over
            # on a copy without it before the application hears "done".
            await self._fenced()

    # -- fencing the peer off its old copy (docs/replication.md, acknowledgement rule)
    def _request_fence(self) -> None:
        if self.fence is None or not self._fence_needed or self._fence_token is not None:
            return
        self._fence_token = secrets.token_hex(8)
        self._emit("fence_requested", declared=self._status.synced_generation)
        self.fence(self._fence_token, self._status.synced_generation)

    async def _fenced(self) -> None:
        """Return once an acknowledgement without the peer is safe to give (at once if the
        peer was fenced off since it could last adopt our generation)."""
        if self.fence is None or not self._fence_needed:
            return
        done = self._fence_done
        self._request_fence()
        await done.wait()

    def fenced(self, token: str) -> None:
        """The daemon's answer to our fence request: the peer is fenced off its old copy."""
        if token != self._fence_token:
            return  # the answer to a round an in_sync declaration already closed
        self._fence_needed = False
        self._release_fenced()
        self._emit("fenced")

    def _release_fenced(self) -> None:
        self._fence_token = None
        done, self._fence_done = self._fence_done, trio.Event()
        done.set()

    def _fsync_local(self, path: bytes, datasync: bool) -> None:
        fusefs.fsync_backing(os.fsencode(self.backing), path, datasync)

    async def _go_alone(self, reason: str) -> None:
        if self._status.state == "alone":
            self._request_fence()  # a round an in_sync declaration voided may have waiters
            return
        was = self._status.state
        self._status.state = "alone"
        self._status.link = "down"
        self._status.last_error = reason
        link, self._link = self._link, None
        assert self._dirty is not None
        if link is not None:
            for r in link.unacked():
                self._dirty.note(r)
        if self._al is not None:
            self._al.link_changed()
        await trio.to_thread.run_sync(self._dirty.sync)
        if was == "sync":
            self._emit("peer_lost", reason=reason)
        self._request_fence()  # start now: the daemon's wait runs while the barriers finish

    # -- primary
    async def run_primary(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._status.role = "primary"
        self._status.state = "alone"
        self.backing.mkdir(parents=True, exist_ok=True)
        self.app_dir.mkdir(parents=True, exist_ok=True)
        first = not self.dirty_path.exists()
        self._dirty = DirtyLog(self.dirty_path)
        self._dirty.open()
        if first and self._read_synced() is None:
            self._dirty.mark_lost()  # never synced: the peer's copy is unknown
            self._dirty.sync()
        self._al = ActivityLog(self.al_path, extents=self.settings.al_extents)
        self._al.open()
        # Left hot by a past run that ended in sync without draining: the peer may lack it.
        hot = self._al.entries()
        if self._al.fold_into(self._dirty):
            self._emit("activity_log_folded", entries=hot)
        self._status.rejected = dict(self._dirty.rejected)
        try:
            async with trio.open_nursery() as n:
                await n.start(
                    lambda task_status: fusefs.serve(
                        backing=self.backing, mountpoint=self.app_dir, sink=self,
                        fsname=f"hapair-{self.module.name}", task_status=task_status,
                    )
                )  # fmt: skip
                task_status.started()
                n.start_soon(self._trim_activity)
                await self._connect_loop()
        finally:
            self._dirty.close()
            self._al.close()
            link = self._link
            if self._drained is not None and (link is None or link.seq == self._drained):
                # The peer holds everything: no dirty log means "nothing the peer lacks".
                self.dirty_path.unlink(missing_ok=True)
                self.al_path.unlink(missing_ok=True)

    async def _trim_activity(self) -> None:
        """In sync: now and then drop from the activity log what the peer acknowledged and
        nobody used lately, so a crash leaves only recent activity to resync."""
        while True:
            await trio.sleep(AL_IDLE_S / 2)
            link, al = self._link, self._al
            if self._status.state == "sync" and link is not None and al is not None:
                try:
                    await trio.to_thread.run_sync(al.trim, link.durable_seq)
                except OSError as e:
                    # The file keeps entries the peer has (more to resync after a crash,
                    # never less); a full disk must not take replication down.
                    log.warning("replication: cannot trim the activity log: %s", e)

    def _addresses(self) -> list[tuple[str, int]]:
        spec = self.cluster.peer(self.peer)
        nets = [n for n in self.settings.networks if n in spec.addresses]
        nets += [n for n in sorted(spec.addresses) if n not in nets]
        return [(spec.addresses[n], self.settings.port) for n in nets]

    async def _connect_loop(self) -> None:
        ctx = client_context(self.tls)
        attempt = 0
        refused: list[str] = []

        def on_refused(m: str) -> None:
            refused.append(m)
            self._emit("link_refused", reason=m)

        while True:
            refused.clear()
            t0 = trio.current_time()
            try:
                conn = await connect(
                    addresses=self._addresses(), peer=self.peer, ctx=ctx, key=self.key,
                    timeout=self.settings.timeout_s, on_refused=on_refused,
                )  # fmt: skip
            except LinkLost as e:
                self._status.last_error = str(e)
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
            link = PrimaryLink(
                conn, timeout=self.settings.timeout_s, durable=self.settings.ack == "durable",
                max_inflight=self.settings.max_inflight_bytes, on_rejected=self._rejected,
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
                    log.exception("replication %s: session failed", self.module.name)
                    self._status.session_errors += 1
                    link.fail(f"session error: {type(e).__name__}: {e}")
                n.cancel_scope.cancel()
            lasted = trio.current_time() - t_session
            self._count_refused_incremental(link)
            await self._go_alone(link.lost_reason or "link closed")
            self._link = None
            # A secondary that fails every session within moments (its disk full: a short
            # resync reaches sync, the next write fails) must not be reconnected to in a
            # tight loop: back off until a session lasts.
            attempt = 0 if lasted >= STABLE_SESSION_S else attempt + 1
            await trio.sleep(backoff(attempt))

    def _count_refused_incremental(self, link: PrimaryLink) -> None:
        """After a session: an incremental resync the secondary refused (it sent an error:
        a record it could not apply) counts; FALLBACK_FULL_AFTER of them in a row make the
        next resync full, loudly. A link lost otherwise (network) does not count."""
        assert self._dirty is not None
        if self._progress is None:  # the resync completed (or none started)
            self._refused_incremental = 0
            return
        # (Not the state: "sync" begins with the final barrier, before the peer applied it.)
        refused = (link.lost_reason or "").startswith("secondary error")
        if self._dirty.state.lost or not refused:
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
            self.module.name, FALLBACK_FULL_AFTER, link.lost_reason,
        )  # fmt: skip
        self._emit("resync_fallback_full", attempts=FALLBACK_FULL_AFTER, reason=link.lost_reason)

    async def _session(self, link: PrimaryLink) -> None:
        assert self._dirty is not None
        hello, _ = await link.request(
            {"op": "hello", "module": self.module.name, "node": self.cluster.node,
             "untagged": True}
        )  # fmt: skip
        if hello.get("error"):
            raise LinkLost(str(hello["error"]))
        # A secondary that reads version 3 frames says so; an older one does not answer it.
        link.untagged = hello.get("untagged") is True
        self._status.link = "connected"
        self._emit("peer_connected", address=link.conn.peer)
        full, quarantine = self._resync_request or (False, False)
        self._resync_request = None
        # From here on, what the application changes while the resync works is gathered
        # too (settle reconciles it): the snapshot and the watch start together.
        state = self._dirty.snapshot(watch=True)
        why = self._resync_kind(hello)
        if why is not None:
            full = True
            quarantine = quarantine or why.startswith(("split brain", "first"))
            self._emit("resync_full_needed", reason=why, quarantine=quarantine)
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
        self._link = link
        self._status.state = "resyncing"  # live writes: noted dirty and shipped
        self._progress = Progress()
        self._emit("resync_started", full=full, **detail)
        if full:
            # The log now says "full needed" until the end; live writes are noted too.
            self._dirty.clear()
            self._dirty.mark_lost()
            await trio.to_thread.run_sync(self._dirty.sync)
        try:
            await resync.run(link, self.backing, state, self._progress, full=full,
                             changes=self._dirty.take_watch, quarantine=quarantine,
                             on_progress=self._on_progress)  # fmt: skip
        finally:
            self._dirty.end_watch()
        # Everything the activity log held is in the dirty log or on the peer: start afresh
        # (the dirty log keeps covering what goes before the final barrier).
        assert self._al is not None
        await trio.to_thread.run_sync(self._al.clear)
        # Switch to synchronous replication atomically with the final barrier.
        seq = link.submit(Record(0, Op.FSYNC, b""))
        self._status.state = "sync"
        await link.wait_acked(seq, timeout=max(self.settings.timeout_s, 60.0))
        await trio.to_thread.run_sync(self._dirty.clear)
        done = self._progress.as_dict()
        self._progress = None
        await self._declare_in_sync(link)
        self._emit("resync_done", **done)

    def _resync_kind(self, hello: dict[str, Any]) -> str | None:
        """Why the peer needs a full (checksum delta) resync; None: our dirty log covers it.

        The dirty log holds what changed since both copies were identical at ``synced``;
        it is enough only if the peer's copy is that same copy, untouched since."""
        local = self.generations.load().generation
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
        ours = self._read_synced()
        if ours is None or hello.get("synced") != ours:
            return "the two copies were not last identical at the same generation"
        return None

    def _read_synced(self) -> str | None:
        try:
            return self.synced_path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _write_synced(self, gen: str) -> None:
        atomic_write(self.synced_path, (gen + "\n").encode())

    async def _declare_in_sync(self, link: PrimaryLink) -> None:
        """Tell the secondary it is in sync at our current generation (in stream order)."""
        gen = self.generation or f"{self.generations.load().generation.current:016x}"
        await trio.to_thread.run_sync(self._write_synced, gen)
        # From here the peer may adopt `gen`: losing the link again needs a new fence, and
        # the answer to a round asked before no longer covers it (its waiters stay waiting).
        self._status.synced_generation = gen
        self._fence_needed = True
        self._fence_token = None
        await link.request({"op": "in_sync", "generation": gen})
        # The peer has everything up to the final barrier: what waited for a fence is on it.
        self._release_fenced()

    async def set_generation(self, gen: str) -> None:
        """Primary: the manager's generation changed; re-declare sync under the new label."""
        self.generation = gen
        link = self._link
        if self._status.state == "sync" and link is not None and not link.lost_reason:
            try:
                await self._declare_in_sync(link)
            except LinkLost as e:
                await self._go_alone(str(e))

    async def drain(self, timeout: float) -> bool:
        """Primary stopping (application already stopped): wait until the peer has made
        everything durable. True: the copies are identical, the dirty log is dropped."""
        link = self._link
        if link is None or self._status.state != "sync" or link.lost_reason:
            return False
        seq = link.submit(Record(0, Op.FSYNC, b""))
        try:
            await link.wait_acked(seq, timeout=timeout)
            await self._declare_in_sync(link)
        except LinkLost as e:
            await self._go_alone(str(e))
            return False
        self._drained = seq
        return True

    def _on_progress(self, p: Progress) -> None:
        self._emit("resync_progress", **p.as_dict())

    async def verify(self) -> VerifyReport:
        link = self._link
        if link is None or self._status.state != "sync":
            raise LinkLost("not in sync with the peer")
        seq = link.submit(Record(0, Op.FSYNC, b""))
        await link.wait_acked(seq)
        # First pass with the application running: the secondary digests its copy at this
        # journal position, the primary its own a little later, so a file written meanwhile
        # may differ without being different.
        theirs_reply, _ = await link.request({"op": "digest"})
        ours = await trio.to_thread.run_sync(tree.tree_digests, self.backing)
        theirs = theirs_reply.get("digests", {})
        diffs = tree.compare(ours, theirs)
        if not diffs:
            return VerifyReport(True, len(ours), [])
        # Final comparison of those paths only, at one journal position: mutating operations
        # wait (a short quiesce, a few files), a barrier drains the journal, both digest.
        paths = sorted({p for p in set(ours) | set(theirs) if ours.get(p) != theirs.get(p)})
        self._paused = trio.Event()
        try:
            seq = link.submit(Record(0, Op.FSYNC, b""))
            await link.wait_acked(seq)
            theirs_reply, _ = await link.request({"op": "digest", "paths": paths})
            mine = await trio.to_thread.run_sync(tree.digests_of, self.backing, paths)
        finally:
            paused, self._paused = self._paused, None
            paused.set()
        diffs = tree.compare(mine, theirs_reply.get("digests", {}))
        return VerifyReport(not diffs, len(ours), diffs)

    # -- secondary
    async def run_secondary(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._status.role = "secondary"
        self.backing.mkdir(parents=True, exist_ok=True)
        applier = Applier(self.backing)
        ctx = server_context(self.tls)
        addrs = sorted(set(self.cluster.this_node.addresses.values()))

        async def barrier() -> int:
            await trio.to_thread.run_sync(applier.barrier)
            return applier.durable_seq

        async def handler(conn: Conn) -> None:
            async def control(obj: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
                reply = await self._control(applier, obj)
                if (
                    obj.get("op") == "hello"
                    and obj.get("untagged") is True
                    and "error" not in reply[0]
                ):
                    # The primary offers frames without a tag (TLS authenticates them): read
                    # them from now on, before the answer leaves that lets it send them.
                    conn.accept_untagged()
                    reply[0]["untagged"] = True
                return reply

            self._status.link = "connected"
            self._status.state = "resyncing"
            try:
                await SecondarySession(
                    conn, applier.apply, barrier, control,
                    durable=self.settings.ack == "durable",
                    on_rejected=self._rejected,
                ).run()  # fmt: skip
            finally:
                self._status.link = "down"
                self._status.state = "idle"
                self._status.synced_generation = None

        try:
            async with trio.open_nursery() as n:
                await n.start(
                    lambda task_status: serve(
                        addresses=addrs, port=self.settings.port, peer=self.peer, ctx=ctx,
                        key=self.key, handler=handler, task_status=task_status,
                        on_refused=lambda m: self._emit("link_refused", reason=m),
                        on_rejected=self._rejected,
                    )
                )  # fmt: skip
                task_status.started()
        finally:
            applier.close()

    def _rejected(self, reason: str) -> None:
        self._status.rejected[reason] = self._status.rejected.get(reason, 0) + 1
        self._emit("link_refused", reason=reason)

    async def _control(self, applier: Applier, obj: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Answer one control request of the primary. Whatever the request holds (missing
        or wrong-typed fields, invalid paths), the answer is a reply, an error one if need
        be, never an exception that would end the session or the service."""
        op = obj.get("op")
        try:
            return await self._control_op(applier, op, obj)
        except Exception as e:
            log.warning("replication: control %s refused: %s", _brief(op), _brief(e))
            return {"error": f"control {_brief(op)}: {type(e).__name__}: {_brief(e)}"}, b""

    async def _control_op(
        self, applier: Applier, op: Any, obj: dict[str, Any]
    ) -> tuple[dict[str, Any], bytes]:
        if op == "hello":
            return await self._hello(obj), b""
        if op not in ("in_sync", "list", "digest", "sig", "quarantine"):
            return {"error": f"unknown control {_brief(op)}"}, b""
        await trio.to_thread.run_sync(applier.barrier)
        if op == "in_sync":
            gen = obj.get("generation")
            if not isinstance(gen, str) or not _GENERATION.fullmatch(gen):
                return {"error": f"in_sync: generation {_brief(gen)} is not hex"}, b""
            await trio.to_thread.run_sync(self._write_synced, gen)
            self.dirty_path.unlink(missing_ok=True)
            self.al_path.unlink(missing_ok=True)
            self._status.state = "sync"
            if self._status.synced_generation != gen:
                self._status.synced_generation = gen
                self._emit("in_sync", generation=gen)
            return {"_durable": applier.durable_seq}, b""
        if op == "list":
            raw = obj.get("paths")
            scope = None if raw is None else set(_rel_paths(raw))
            listing = await trio.to_thread.run_sync(tree.list_tree, self.backing, scope)
            return {"tree": listing}, b""
        if op == "digest":
            raw = obj.get("paths")
            if raw is None:
                return {
                    "digests": await trio.to_thread.run_sync(tree.tree_digests, self.backing)
                }, b""
            wanted = [os.fsdecode(p) for p in _rel_paths(raw)]
            digests = await trio.to_thread.run_sync(tree.digests_of, self.backing, wanted)
            return {"digests": digests}, b""
        if op == "sig":
            rels = _rel_paths([obj.get("path")])
            if not rels:
                return {"error": f"sig: path {_brief(obj.get('path'))} is not a relative path"}, b""
            sig = await trio.to_thread.run_sync(self._signature, rels[0])
            return {}, sig.encode()
        paths = _rel_paths(obj.get("paths"))
        where, res = await trio.to_thread.run_sync(self._quarantine, paths)
        self._emit("split_brain_quarantine", directory=str(where), files=res.copied)
        reply: dict[str, Any] = {"directory": str(where), "copied": res.copied}
        if res.errors:
            # Something of the copy could not be saved: the primary must not overwrite it.
            reply["error"] = f"quarantine incomplete ({len(res.errors)}): " + "; ".join(
                res.errors[:5]
            )
        return reply, b""

    async def _hello(self, obj: dict[str, Any]) -> dict[str, Any]:
        if obj.get("module") != self.module.name:
            return {"error": f"module {_brief(obj.get('module'))} is not {self.module.name!r}"}
        g = self.generations.load().generation
        dirty = self.dirty_path.exists()
        activity = None
        if dirty:
            plan = await trio.to_thread.run_sync(load_activity, self.al_path, self.dirty_path)
            activity = plan_to_wire(*plan)
        return {
            "module": self.module.name,
            "node": self.cluster.node,
            "generation": {
                "current": f"{g.current:016x}",
                "history": [f"{h:016x}" for h in g.history],
            },
            "synced": self._read_synced(),
            # A dirty log here means this node was primary since it was last in sync;
            # what it may hold that the peer lacks: its activity and dirty logs.
            "dirty": dirty,
            "activity": activity,
        }

    def _signature(self, rel: bytes) -> D.Signature:
        """The signature of regular file ``rel``, opened beneath the backing root."""
        root = os.open(self.backing, beneath.DIR_FLAGS)
        try:
            pfd, name = beneath.open_parent(root, rel)
            try:
                fd = beneath.open_file(name, pfd)
            finally:
                if pfd != root:
                    os.close(pfd)
        finally:
            os.close(root)
        try:
            return D.signature_fd(fd)
        finally:
            os.close(fd)

    def _quarantine(self, paths: list[bytes]) -> tuple[Path, quarantine.Result]:
        """Copy ``paths`` (resolved beneath the backing root, never through a symlink) into
        a new quarantine directory, through directory descriptors on both sides."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        dest = self.quarantine_root / stamp / self.backing.name
        dest.mkdir(parents=True, exist_ok=True)  # ours: the peer writes only in the backing
        root_fd = os.open(self.backing, beneath.DIR_FLAGS)
        try:
            dest_fd = os.open(dest, beneath.DIR_FLAGS)
            try:
                res = quarantine.copy_paths(root_fd, dest_fd, paths)
            finally:
                os.close(dest_fd)
        finally:
            os.close(root_fd)
        os.sync()
        return dest, res


# A generation as the primary declares it: hex digits (the manager's 16).
_GENERATION = re.compile(r"[0-9a-f]{1,64}")
_BRIEF = 120  # characters of a peer's value quoted in an error


def _brief(v: Any) -> str:
    """A peer's value quoted in a log line or error reply, bounded."""
    try:
        r = repr(v) if not isinstance(v, BaseException) else str(v)
    except RecursionError:  # a list nested 10 000 deep
        r = f"<deeply nested {type(v).__name__}>"
    return r if len(r) <= _BRIEF else r[:_BRIEF] + "..."


def _rel_paths(raw: Any) -> list[bytes]:
    """The valid relative paths of a request's list (JSON strings, non-UTF-8 bytes carried
    as surrogate escapes); anything else in it is left out."""
    if not isinstance(raw, list):
        return []
    out: list[bytes] = []
    for p in raw:
        if not isinstance(p, str):
            continue
        try:
            rel = os.fsencode(p)
        except UnicodeEncodeError:
            continue  # a lone surrogate that no file name decodes to
        if valid_path(rel):
            out.append(rel)
    return out


def _parse_gen(raw: Any) -> Generation | None:
    try:
        return Generation(int(raw["current"], 16), tuple(int(h, 16) for h in raw["history"]))
    except (KeyError, TypeError, ValueError):
        return None


def now() -> float:
    return time.time()
