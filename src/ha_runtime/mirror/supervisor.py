"""The daemon's side of replication: one supervised child process per replicated directory.

A mirror module owns one ``ReplicationSupervisor``. On the primary it starts one
``hactl replicate primary`` child per ``replicated_dirs`` entry (each mounts its FUSE file
system and connects to the peer) and only then starts the application; on the secondary,
``hactl replicate secondary`` children receive into the backing directories. Their status
and events come back over a pipe (protocol: ``replication.child``).

A role change hands the role to a spare child started ahead (``spares.SparePool``), so
that neither node of a switchover waits for a new interpreter to import the runtime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ha_runtime.config import ClusterConfig, ModuleConfig
from ha_runtime.jsonlines import json_objects
from ha_runtime.mirror.spares import SparePool
from ha_runtime.replication.child import mounted, unmount
from ha_runtime.replication.layout import Layout

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
RESPAWN_DELAY_S = 1.0

EventSink = Callable[[int, str, dict[str, Any]], None]


class ReplicationError(Exception):
    """Replication could not be started or asked: the message says why."""


@dataclass
class DirChild:
    index: int
    app_dir: Path
    role: str
    proc: trio.Process | None = None
    status: dict[str, Any] = field(default_factory=dict)
    started: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)
    stopping: bool = False
    returncode: int | None = None
    replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    reply_ready: trio.Event = field(default_factory=trio.Event)
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    since: float = field(default_factory=time.time)

    async def send(self, obj: dict[str, Any]) -> None:
        if self.proc is None or self.proc.stdin is None or self.exited.is_set():
            raise ReplicationError(f"replication of {self.app_dir} is not running")
        async with self.send_lock:
            try:
                await self.proc.stdin.send_all((json.dumps(obj) + "\n").encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise ReplicationError(f"replication of {self.app_dir} is not running") from e


class ReplicationSupervisor:
    def __init__(
        self,
        cluster: ClusterConfig,
        module: ModuleConfig,
        on_event: EventSink,
        command: Callable[[str, int], list[str]] | None = None,
    ) -> None:
        self.cluster = cluster
        self.m = module
        self.on_event = on_event
        self.command = command or self._default_command
        # An injected command (a test's scripted child) has no spare form.
        self.spares = (
            SparePool(module.name, len(module.replicated_dirs), self._spare_command)
            if command is None and module.replicated_dirs
            else None
        )
        self.role: str | None = None
        self.children: dict[int, DirChild] = {}
        self.generation: str | None = None
        self._nursery: trio.Nursery | None = None
        self._req = 0
        self.layouts = [
            Layout.of(module, i, cluster.state_dir, module.replication)
            for i in range(len(module.replicated_dirs))
        ]

    def _default_command(self, role: str, index: int) -> list[str]:
        return [
            sys.executable, "-m", "ha_runtime.cli", "--config", str(self.cluster.path),
            "replicate", role, self.m.name, "--dir", str(index),
        ]  # fmt: skip

    def _spare_command(self, index: int) -> list[str]:
        return self._default_command("spare", index)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            self._nursery = n
            task_status.started()
            if self.spares is not None:
                n.start_soon(self.spares.run)
            await trio.sleep_forever()

    async def _open(self, c: DirChild) -> trio.Process:
        """The child for c: the directory's spare given c's role, or a new process."""
        if self.spares is not None:
            spare = await self.spares.take(c.index, c.role)
            if spare is not None:
                return spare
        return await trio.lowlevel.open_process(
            self.command(c.role, c.index), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    # ----------------------------------------------------------------- lifecycle

    async def start(self, role: str, timeout: float = START_TIMEOUT_S) -> None:
        """Run `role` ("primary" or "secondary") for every directory; returns once every
        child is up (primary: mounted). Raises ReplicationError (nothing left running)."""
        if self.role == role and all(not c.exited.is_set() for c in self.children.values()):
            return
        await self.stop()
        assert self._nursery is not None, "ReplicationSupervisor.run() must be running"
        self.role = role
        for i, d in enumerate(self.m.replicated_dirs):
            c = DirChild(i, d, role)
            self.children[i] = c
            self._nursery.start_soon(self._supervise, c)
        failed: list[str] = []
        with trio.move_on_after(timeout):
            for c in self.children.values():
                async with trio.open_nursery() as w:
                    w.start_soon(_set_when, c.started, w.cancel_scope)
                    w.start_soon(_set_when, c.exited, w.cancel_scope)
        for c in self.children.values():
            if not c.started.is_set():
                failed.append(
                    f"{c.app_dir}: replication {role} did not start"
                    + (f" (exit code {c.returncode})" if c.exited.is_set() else " in time")
                )
        if failed:
            await self.stop()
            raise ReplicationError("; ".join(failed))
        if role == "primary" and self.generation is not None:
            await self.set_generation(self.generation)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop every child: a primary drains the peer and unmounts first."""
        if timeout is None:
            timeout = 2 * self.m.replication.timeout_ms / 1000 + 10
        children = list(self.children.values())
        for c in children:
            c.stopping = True
            if c.exited.is_set() or c.proc is None:
                continue
            with contextlib.suppress(ReplicationError):
                await c.send({"cmd": "stop"})
        with trio.move_on_after(timeout):
            for c in children:
                await c.exited.wait()
        for c in children:
            if not c.exited.is_set() and c.proc is not None:
                log.warning(
                    "%s: replication of %s did not stop: killing it", self.m.name, c.app_dir
                )
                c.proc.kill()
                with trio.move_on_after(5):
                    await c.exited.wait()
        for c in children:
            if c.role == "primary" and mounted(c.app_dir):
                try:
                    await trio.to_thread.run_sync(unmount, c.app_dir)
                except OSError:
                    log.exception("%s: cannot unmount %s", self.m.name, c.app_dir)
        self.children = {}
        self.role = None

    async def _supervise(self, c: DirChild) -> None:
        first = True
        while True:
            if not first:  # a respawn: start() waits on the events of the first run
                c.started, c.exited = trio.Event(), trio.Event()
            first = False
            try:
                c.proc = await self._open(c)
            except OSError:
                log.exception("%s: cannot run replication of %s", self.m.name, c.app_dir)
                c.exited.set()
                return
            c.since = time.time()
            try:
                await self._read(c)
            finally:
                with trio.CancelScope(shield=True):
                    # Cancelled (daemon torn down without stop()): SIGTERM drains and
                    # unmounts like "stop"; a child that does not go is killed.
                    if c.proc.returncode is None and not c.stopping:
                        c.proc.terminate()
                    with trio.move_on_after(2 * self.m.replication.timeout_ms / 1000 + 10):
                        await c.proc.wait()
                    if c.proc.returncode is None:
                        c.proc.kill()
                    c.returncode = await c.proc.wait()
                c.status = {**c.status, "state": "stopped", "link": "down"}
                c.exited.set()
                c.reply_ready.set()
            if c.stopping:
                return
            self.on_event(c.index, "replication_exited", {"role": c.role, "code": c.returncode})
            if c.role != "secondary" or self.children.get(c.index) is not c:
                return  # a primary's mount is gone: the mirror module decides (app must stop)
            await trio.sleep(RESPAWN_DELAY_S)
            if c.stopping:
                return

    async def _read(self, c: DirChild) -> None:
        assert c.proc is not None and c.proc.stdout is not None
        async for msg in json_objects(c.proc.stdout):
            self._dispatch(c, msg)

    def _dispatch(self, c: DirChild, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "started":
            c.started.set()
            self.on_event(c.index, "replication_started", {"role": c.role})
        elif kind == "status" and isinstance(msg.get("status"), dict):
            old = c.status.get("state")
            c.status = msg["status"]
            if c.status.get("state") != old:
                self.on_event(c.index, "__state__", {"state": c.status.get("state")})
        elif kind == "event":
            self.on_event(c.index, str(msg.get("kind")), dict(msg.get("detail") or {}))
        elif kind == "fence" and isinstance(msg.get("token"), str):
            declared = msg.get("declared")
            if not isinstance(declared, str):
                declared = None
            self.on_event(c.index, "__fence__", {"token": msg["token"], "declared": declared})
        elif kind == "reply" and isinstance(msg.get("id"), int):
            c.replies[msg["id"]] = msg
            c.reply_ready.set()

    # ----------------------------------------------------------------- requests

    async def set_generation(self, gen: str) -> None:
        self.generation = gen
        if self.role != "primary":
            return
        for c in self.children.values():
            with contextlib.suppress(ReplicationError):
                await c.send({"cmd": "generation", "value": gen})

    async def fenced(self, index: int, token: str) -> None:
        """Answer a primary child's fence request (a child restarted since ignores it)."""
        c = self.children.get(index)
        if c is not None and c.role == "primary":
            with contextlib.suppress(ReplicationError):
                await c.send({"cmd": "fenced", "token": token})

    async def _ask(self, c: DirChild, obj: dict[str, Any], timeout: float) -> dict[str, Any]:
        self._req += 1
        rid = self._req
        await c.send({**obj, "id": rid})
        with trio.move_on_after(timeout):
            while rid not in c.replies:
                if c.exited.is_set():
                    raise ReplicationError(f"replication of {c.app_dir} stopped")
                c.reply_ready = trio.Event()
                await c.reply_ready.wait()
            return c.replies.pop(rid)
        raise ReplicationError(f"replication of {c.app_dir} did not answer within {timeout:g} s")

    def _need_primary(self) -> list[DirChild]:
        if self.role != "primary" or not self.children:
            raise ReplicationError("this node is not the primary of the module")
        return list(self.children.values())

    async def verify(self, timeout: float = 600.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for c in self._need_primary():
            r = await self._ask(c, {"cmd": "verify"}, timeout)
            if "error" in r:
                raise ReplicationError(f"{c.app_dir}: {r['error']}")
            out.append({"dir": str(c.app_dir), **r["result"]})
        return out

    async def resync(self, full: bool) -> None:
        for c in self._need_primary():
            await self._ask(c, {"cmd": "resync", "full": full}, 30.0)

    # ----------------------------------------------------------------- views

    def in_sync(self, peer_generation: str | None) -> bool:
        """Every directory replicating synchronously (secondary: at the primary's generation)."""
        if self.role is None or not self.children:
            return False
        for c in self.children.values():
            st = c.status
            if c.exited.is_set() or st.get("state") != "sync":
                return False
            if self.role == "secondary" and st.get("synced_generation") != peer_generation:
                return False
        return True

    def failed_primary(self) -> str | None:
        """A primary child that died: its mount is gone under the application."""
        if self.role != "primary":
            return None
        for c in self.children.values():
            if c.exited.is_set() and not c.stopping:
                return f"replication of {c.app_dir} stopped (exit code {c.returncode})"
        return None

    def quarantines(self) -> list[str]:
        if not self.layouts:
            return []
        root = self.layouts[0].quarantine_root  # one per module
        try:
            return sorted(str(p) for p in root.iterdir())
        except OSError:
            return []

    def status(self, peer_generation: str | None) -> dict[str, Any]:
        dirs = []
        for i, d in enumerate(self.m.replicated_dirs):
            c = self.children.get(i)
            st = dict(c.status) if c is not None else {}
            dirs.append(
                {
                    "dir": str(d),
                    "backing": str(self.layouts[i].backing),
                    "port": self.m.replication.port + i,
                    "role": self.role or "none",
                    "state": st.get("state", "stopped") if c is not None else "stopped",
                    "link": st.get("link", "down"),
                    "address": st.get("address"),
                    "last_seq": st.get("last_seq", 0),
                    "acked_seq": st.get("acked_seq", 0),
                    "inflight_bytes": st.get("inflight_bytes", 0),
                    "dirty_bytes": st.get("dirty_bytes", 0),
                    "dirty_paths": st.get("dirty_paths", 0),
                    "resync": st.get("resync"),
                    "synced_generation": st.get("synced_generation"),
                    "rejected": st.get("rejected", {}),
                    # Frames taken with the other site key of a rotation (security.SiteKeys).
                    "accepted_key_frames": st.get("accepted_key_frames", 0),
                    "last_error": st.get("last_error"),
                    "pid": c.proc.pid if c is not None and c.proc is not None else None,
                }
            )
        states = {d["state"] for d in dirs}
        overall = (
            "stopped"
            if states == {"stopped"}
            else next((s for s in ("alone", "resyncing", "idle", "stopped") if s in states), "sync")
        )
        return {
            "role": self.role or "none",
            "state": overall,
            "in_sync": self.in_sync(peer_generation),
            "ack": self.m.replication.ack,
            "resync": _sum_progress([d["resync"] for d in dirs if d["resync"]]),
            "quarantine": self.quarantines(),
            "dirs": dirs,
        }


def _sum_progress(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return None
    done = sum(int(p.get("bytes_done", 0)) for p in parts)
    left = sum(int(p.get("bytes_left", 0)) for p in parts)
    rate = sum(float(p.get("rate_bps", 0.0)) for p in parts)
    return {
        "kind": ",".join(sorted({str(p.get("kind", "?")) for p in parts})),
        "bytes_done": done,
        "bytes_left": left,
        "rate_bps": rate,
        "eta_s": round(left / rate, 1) if rate > 0 else None,
    }


async def _set_when(ev: trio.Event, scope: trio.CancelScope) -> None:
    await ev.wait()
    scope.cancel()
