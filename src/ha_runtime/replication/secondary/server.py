"""``Secondary``: the secondary of one replicated directory. It listens for the primary
(``link.tls.serve``), runs one session at a time (``link.secondary``) whose records the
applier (``secondary.applier``) writes into the backing directory, and answers the
primary's control requests (``control``): HELLO, IN_SYNC, LIST, DIGEST, SIG, QUARANTINE.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from ha_runtime.replication import beneath, control, tree
from ha_runtime.replication import delta as D
from ha_runtime.replication.activitylog import load_activity, plan_to_wire
from ha_runtime.replication.context import ReplicaContext
from ha_runtime.replication.control import Control
from ha_runtime.replication.link.framing import Conn
from ha_runtime.replication.link.secondary import SecondarySession
from ha_runtime.replication.link.tls import serve, server_context
from ha_runtime.replication.secondary import quarantine
from ha_runtime.replication.secondary.applier import Applier

log = logging.getLogger("hapair.replication")


class Secondary:
    def __init__(self, ctx: ReplicaContext) -> None:
        self.ctx = ctx

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.ctx.status.role = "secondary"
        self.ctx.layout.backing.mkdir(parents=True, exist_ok=True)
        applier = Applier(self.ctx.layout.backing)
        ctx = server_context(self.ctx.tls)
        addrs = sorted(set(self.ctx.cluster.this_node.addresses.values()))

        async def barrier() -> int:
            await trio.to_thread.run_sync(applier.barrier)
            return applier.durable_seq

        async def handler(conn: Conn) -> None:
            async def control(obj: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
                reply = await self.control(applier, obj)
                if (
                    Control.of(obj) is Control.HELLO
                    and obj.get("untagged") is True
                    and "error" not in reply[0]
                ):
                    # The primary offers frames without a tag (TLS authenticates them): read
                    # them from now on, before the answer leaves that lets it send them.
                    conn.accept_untagged()
                    reply[0]["untagged"] = True
                return reply

            self.ctx.status.link = "connected"
            self.ctx.status.state = "resyncing"
            try:
                await SecondarySession(
                    conn, applier.apply, barrier, control,
                    durable=self.ctx.settings.ack == "durable",
                    on_rejected=self.ctx.rejected,
                ).run()  # fmt: skip
            finally:
                self.ctx.status.link = "down"
                self.ctx.status.state = "idle"
                self.ctx.status.synced_generation = None

        try:
            async with trio.open_nursery() as n:
                await n.start(
                    lambda task_status: serve(
                        addresses=addrs, port=self.ctx.settings.port, peer=self.ctx.peer, ctx=ctx,
                        key=self.ctx.key, handler=handler, task_status=task_status,
                        on_refused=lambda m: self.ctx.emit("link_refused", reason=m),
                        on_rejected=self.ctx.rejected, accepted=self.ctx.accepted,
                    )
                )  # fmt: skip
                task_status.started()
        finally:
            applier.close()

    async def control(self, applier: Applier, obj: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Answer one control request of the primary. Whatever the request holds (missing
        or wrong-typed fields, invalid paths), the answer is a reply, an error one if need
        be, never an exception that would end the session or the service."""
        try:
            return await self._control_op(applier, obj)
        except Exception as e:
            op = control.brief(obj.get("op"))
            log.warning("replication: control %s refused: %s", op, control.brief(e))
            return control.refused(obj, e), b""

    async def _control_op(
        self, applier: Applier, obj: dict[str, Any]
    ) -> tuple[dict[str, Any], bytes]:
        op = Control.of(obj)
        if op is None:
            return control.unknown(obj), b""
        if op is Control.HELLO:
            return await self._hello(obj), b""
        # Every other request answers for what the records before it did: applied, durable.
        await trio.to_thread.run_sync(applier.barrier)
        backing = self.ctx.layout.backing
        match op:
            case Control.IN_SYNC:
                return await self._in_sync(applier, obj), b""
            case Control.LIST:
                raw = obj.get("paths")
                scope = None if raw is None else set(control.rel_paths(raw))
                listing = await trio.to_thread.run_sync(tree.list_tree, backing, scope)
                return {"tree": listing}, b""
            case Control.DIGEST:
                raw = obj.get("paths")
                if raw is None:
                    return {
                        "digests": await trio.to_thread.run_sync(tree.tree_digests, backing)
                    }, b""
                wanted = [os.fsdecode(p) for p in control.rel_paths(raw)]
                digests = await trio.to_thread.run_sync(tree.digests_of, backing, wanted)
                return {"digests": digests}, b""
            case Control.SIG:
                rels = control.rel_paths([obj.get("path")])
                if not rels:
                    path = control.brief(obj.get("path"))
                    return {"error": f"sig: path {path} is not a relative path"}, b""
                sig = await trio.to_thread.run_sync(self._signature, rels[0])
                return {}, sig.encode()
            case Control.QUARANTINE:
                return await self._quarantine_request(obj), b""

    async def _in_sync(self, applier: Applier, obj: dict[str, Any]) -> dict[str, Any]:
        gen = obj.get("generation")
        if not isinstance(gen, str) or not control.GENERATION.fullmatch(gen):
            return {"error": f"in_sync: generation {control.brief(gen)} is not hex"}
        await trio.to_thread.run_sync(self.ctx.write_synced, gen)
        self.ctx.layout.dirty.unlink(missing_ok=True)
        self.ctx.layout.activity.unlink(missing_ok=True)
        self.ctx.status.state = "sync"
        if self.ctx.status.synced_generation != gen:
            self.ctx.status.synced_generation = gen
            self.ctx.emit("in_sync", generation=gen)
        return {"_durable": applier.durable_seq}

    async def _quarantine_request(self, obj: dict[str, Any]) -> dict[str, Any]:
        paths = control.rel_paths(obj.get("paths"))
        where, res = await trio.to_thread.run_sync(self._quarantine, paths)
        self.ctx.emit("split_brain_quarantine", directory=str(where), files=res.copied)
        reply: dict[str, Any] = {"directory": str(where), "copied": res.copied}
        if res.errors:
            # Something of the copy could not be saved: the primary must not overwrite it.
            reply["error"] = f"quarantine incomplete ({len(res.errors)}): " + "; ".join(
                res.errors[:5]
            )
        return reply

    async def _hello(self, obj: dict[str, Any]) -> dict[str, Any]:
        if obj.get("module") != self.ctx.module.name:
            theirs = control.brief(obj.get("module"))
            return {"error": f"module {theirs} is not {self.ctx.module.name!r}"}
        g = self.ctx.generations.load().generation
        dirty = self.ctx.layout.dirty.exists()
        activity = None
        if dirty:
            plan = await trio.to_thread.run_sync(
                load_activity, self.ctx.layout.activity, self.ctx.layout.dirty
            )
            activity = plan_to_wire(*plan)
        return {
            "module": self.ctx.module.name,
            "node": self.ctx.cluster.node,
            "generation": {
                "current": f"{g.current:016x}",
                "history": [f"{h:016x}" for h in g.history],
            },
            "synced": self.ctx.read_synced(),
            # A dirty log here means this node was primary since it was last in sync;
            # what it may hold that the peer lacks: its activity and dirty logs.
            "dirty": dirty,
            "activity": activity,
            "batch": True,  # the applier applies BATCH records (a resync's small ones)
        }

    def _signature(self, rel: bytes) -> D.Signature:
        """The signature of regular file ``rel``, opened beneath the backing root."""
        root = os.open(self.ctx.layout.backing, beneath.DIR_FLAGS)
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
        dest = self.ctx.layout.quarantine_root / stamp / self.ctx.layout.backing.name
        dest.mkdir(parents=True, exist_ok=True)  # ours: the peer writes only in the backing
        root_fd = os.open(self.ctx.layout.backing, beneath.DIR_FLAGS)
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
