"""Site key rotation on the replication side: frames and on-disk logs across the change.

During the rotation the two nodes switch to the new key at different moments: a link
between a node on the old key and one on the new must authenticate both ways (each takes
the other's tags with its accepted key, counted), a frame under a third key still ends
the session, and what the dirty and activity logs hold must be read after the switch, when
the old key is gone (they are not keyed with the site key: their tags are checksums).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from ha_runtime.replication.activitylog import ActivityLog
from ha_runtime.replication.dirtylog import DirtyLog
from ha_runtime.replication.journal import (
    FrameDecoder,
    Kind,
    Op,
    Record,
    derive_key,
    encode_frame,
    record_frame,
)
from ha_runtime.replication.link.framing import AcceptedKeys, Conn, LinkLost
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.link.secondary import SecondarySession
from ha_runtime.replication.link.tls import TlsFiles, client_context, connect
from ha_runtime.replication.secondary.applier import Applier
from ha_runtime.replication.service import ReplicationService
from tests.linkpair import serve_secondary
from tests.sitefactory import free_tcp_port, replication_cluster, replication_module, write_key

OLD, NEW, THIRD = b"o" * 48, b"n" * 48, b"t" * 48
D_OLD, D_NEW, D_THIRD = derive_key(OLD), derive_key(NEW), derive_key(THIRD)


def test_the_decoder_takes_a_tag_of_the_accepted_key_and_counts_it() -> None:
    taken: list[int] = []
    dec = FrameDecoder(D_NEW, accepted=(D_OLD,), on_accepted=lambda: taken.append(1))
    rec = Record(1, Op.WRITE, b"f", offset=0, data=b"x")
    frames = dec.feed(record_frame(rec, D_NEW) + record_frame(rec, D_OLD))
    assert [f.kind for f in frames] == [Kind.RECORD, Kind.RECORD]
    assert dec.accepted_frames == 1 and taken == [1]  # the current key's frame: not counted
    assert dec.failed is None


def test_a_tag_of_a_third_key_is_refused_and_counted() -> None:
    dec = FrameDecoder(D_NEW, accepted=(D_OLD,))
    assert dec.feed(encode_frame(Kind.PING, b"", D_THIRD)) == []
    assert dec.failed == "bad_tag" and dec.rejected == {"bad_tag": 1}
    assert dec.accepted_frames == 0
    # Without a rotation under way the old key is a third key like any other.
    after = FrameDecoder(D_NEW)
    assert after.feed(encode_frame(Kind.PING, b"", D_OLD)) == []
    assert after.failed == "bad_tag"


async def _no_control(obj: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    return {"echo": obj.get("op")}, body


def _secondary_run(
    applier: Applier, tls: TlsFiles, port: int, key: bytes, *, accepted: AcceptedKeys,
    refused: list[str],
) -> Callable[..., Any]:  # fmt: skip
    """node2's listener on `port` with `key` (and the `accepted` keys), applying to `applier`."""

    async def barrier() -> int:
        applier.barrier()
        return applier.applied_seq

    async def handler(conn: Conn) -> None:
        await SecondarySession(
            conn, applier.apply, barrier, _no_control, on_rejected=refused.append
        ).run()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            await serve_secondary(
                n, tls, key, port, handler, on_refused=refused.append, accepted=accepted
            )
            task_status.started()

    return run


class Count:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


@pytest.mark.parametrize(
    ("primary_key", "secondary_key"), [(D_OLD, D_NEW), (D_NEW, D_OLD)], ids=["old-new", "new-old"]
)
def test_a_link_between_the_old_and_the_new_key_works_both_ways(
    tmp_path: Path, site: dict[str, TlsFiles], primary_key: bytes, secondary_key: bytes
) -> None:
    port = free_tcp_port()
    refused: list[str] = []
    applier = Applier(tmp_path / "second")
    on_primary, on_secondary = Count(), Count()
    # Each accepts the other key of the rotation, whichever it signs with.
    other = {D_OLD: D_NEW, D_NEW: D_OLD}
    run_secondary = _secondary_run(
        applier, site["node2"], port, secondary_key,
        accepted=AcceptedKeys((other[secondary_key],), on_secondary), refused=refused,
    )  # fmt: skip

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(run_secondary)
            conn = await connect(
                addresses=[("127.0.0.1", port)], peer="node2", ctx=client_context(site["node1"]),
                key=primary_key, timeout=2,
                accepted=AcceptedKeys((other[primary_key],), on_primary),
            )  # fmt: skip
            link = PrimaryLink(conn, timeout=3)
            n.start_soon(link.run)
            link.submit(Record(0, Op.CREATE, b"f", mode=0o100644))
            link.submit(Record(0, Op.WRITE, b"f", offset=0, data=b"rotated"))
            seq = link.submit(Record(0, Op.FSYNC, b"f"))
            with trio.fail_after(10):
                await link.wait_acked(seq)  # the secondary's acks: tagged with its key
                reply, body = await link.request({"op": "x"}, b"body")
            assert reply["echo"] == "x" and body == b"body"
            n.cancel_scope.cancel()

    trio.run(main)
    applier.close()
    assert (tmp_path / "second/f").read_bytes() == b"rotated"
    assert refused == []
    # Frames went each way under the other's key: counted on both ends.
    assert on_primary.n > 0 and on_secondary.n > 0, (on_primary.n, on_secondary.n)


def test_a_primary_on_a_third_key_is_refused_and_nothing_applied(
    tmp_path: Path, site: dict[str, TlsFiles]
) -> None:
    port = free_tcp_port()
    refused: list[str] = []
    applier = Applier(tmp_path / "second")
    taken = Count()
    run_secondary = _secondary_run(
        applier, site["node2"], port, D_NEW, accepted=AcceptedKeys((D_OLD,), taken), refused=refused
    )

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(run_secondary)
            conn = await connect(
                addresses=[("127.0.0.1", port)], peer="node2", ctx=client_context(site["node1"]),
                key=D_THIRD, timeout=2,
            )  # fmt: skip
            link = PrimaryLink(conn, timeout=2)
            n.start_soon(link.run)
            link.submit(Record(0, Op.CREATE, b"f", mode=0o100644))
            seq = link.submit(Record(0, Op.FSYNC, b"f"))
            with pytest.raises(LinkLost), trio.fail_after(10):
                await link.wait_acked(seq)
            n.cancel_scope.cancel()

    trio.run(main)
    applier.close()
    assert any("bad_tag" in r for r in refused), refused
    assert taken.n == 0
    assert not (tmp_path / "second/f").exists()


def _service(tmp: Path) -> ReplicationService:
    """node1's service, its keys read from the site key files as in the child process."""
    cluster = replication_cluster(tmp, "node1", state_dir=tmp / "state")
    return ReplicationService(replication_module(tmp, cluster), cluster)


def test_the_logs_written_under_the_old_key_are_read_after_the_switch(tmp_path: Path) -> None:
    site_key = tmp_path / "key"  # replication_cluster's site_key
    previous = site_key.with_name("key.previous")
    write_key(site_key, OLD)
    before = _service(tmp_path)
    assert before.context.key == D_OLD and before.context.accepted.keys == ()
    dirty = DirtyLog(before.layout.dirty)
    dirty.open()
    dirty.note(Record(0, Op.WRITE, b"db", offset=4096, data=b"x" * 100))
    dirty.note(Record(0, Op.RENAME, b"a", path2=b"b"))
    dirty.sync()
    dirty.close()
    activity = ActivityLog(before.layout.activity)
    activity.open()
    activity.note(Record(7, Op.WRITE, b"hot", offset=0, data=b"y" * 10), acked=0)
    activity.close()
    written = DirtyLog(before.layout.dirty)
    written.open()
    ranges = {p: list(r) for p, r in written.state.ranges.items()}
    written.close()
    assert ranges[b"db"] == [(4096, 4196)]

    # Phase 2 (switch): the new key is current, the old one accepted; then phase 3 (drop).
    write_key(site_key, NEW)
    write_key(previous, OLD)
    switched = _service(tmp_path)
    assert switched.context.key == D_NEW and switched.context.accepted.keys == (D_OLD,)
    previous.unlink()
    dropped = _service(tmp_path)
    assert dropped.context.key == D_NEW and dropped.context.accepted.keys == ()

    again = DirtyLog(dropped.layout.dirty)
    again.open()
    assert {p: list(r) for p, r in again.state.ranges.items()} == ranges
    assert again.rejected == {} and not again.state.lost
    hot = ActivityLog(dropped.layout.activity)
    hot.open()
    assert hot.entries() == 1 and hot.rejected == {}
    assert hot.fold_into(again)  # the hot entry becomes dirty ranges: nothing lost
    assert b"hot" in again.state.ranges
    again.close()
    hot.close()
