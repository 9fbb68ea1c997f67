"""The secondary's blocking lane (``link.lane``) on a real TLS link over loopback: the
stream is handled in the lane's thread, a control request still runs in trio with every
record before it applied and none after it, and the trio-only path gives the same result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from ha_runtime.replication.journal import Op, Record, derive_key
from ha_runtime.replication.link.framing import Conn
from ha_runtime.replication.link.primary import PrimaryLink
from ha_runtime.replication.link.secondary import SecondarySession
from ha_runtime.replication.link.tls import TlsFiles
from ha_runtime.replication.secondary.applier import Applier
from tests.linkpair import connect_primary, serve_secondary
from tests.sitefactory import free_tcp_port

KEY = derive_key(b"l" * 48)


def _data(i: int) -> bytes:
    return b"%03d" % i


@pytest.mark.parametrize("use_lane", [True, False], ids=["lane", "trio"])
def test_records_around_a_slow_control_request_stay_in_order(
    tmp_path: Path, site: dict[str, TlsFiles], use_lane: bool
) -> None:
    port = free_tcp_port()
    applier = Applier(tmp_path / "second")
    seen: dict[str, int] = {}
    sessions: list[SecondarySession] = []

    async def control(obj: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        seen["start"] = applier.applied_seq
        await trio.sleep(0.3)  # the records sent after it arrive meanwhile
        seen["end"] = applier.applied_seq
        return {"ok": True}, b""

    async def barrier() -> int:
        applier.barrier()
        return applier.applied_seq

    async def handler(conn: Conn) -> None:
        s = SecondarySession(conn, applier.apply, barrier, control, use_lane=use_lane)
        sessions.append(s)
        await s.run()

    async def main() -> None:
        async with trio.open_nursery() as n:
            await serve_secondary(n, site["node2"], KEY, port, handler)
            link = PrimaryLink(await connect_primary(site["node1"], KEY, port), timeout=3)
            n.start_soon(link.run)
            link.submit(Record(0, Op.CREATE, b"f", mode=0o100644))
            for i in range(50):
                link.submit(Record(0, Op.WRITE, b"f", offset=3 * i, data=_data(i)))
            before = link.submit(Record(0, Op.FSYNC, b"f"))
            await link.wait_acked(before)
            replies: list[dict[str, Any]] = []

            async def ask() -> None:
                replies.append((await link.request({"op": "slow"}))[0])

            n.start_soon(ask)
            await trio.sleep(0.05)  # the request leaves first
            for i in range(50, 100):
                link.submit(Record(0, Op.WRITE, b"f", offset=3 * i, data=_data(i)))
            last = link.submit(Record(0, Op.FSYNC, b"f"))
            with trio.fail_after(10):
                await link.wait_acked(last)
                while not replies:
                    await trio.sleep(0.01)
            assert link.durable_seq >= last
            n.cancel_scope.cancel()

    trio.run(main)
    applier.close()
    # Every record before the request was applied when it started, none after it before
    # it was answered: the lane's thread did not run ahead of the session task.
    assert seen["start"] == seen["end"] == 52
    assert (tmp_path / "second/f").read_bytes() == b"".join(_data(i) for i in range(100))
    (session,) = sessions
    if use_lane:
        assert session.lane_frames >= 52  # the records before the request: in the lane
    else:
        assert session.lane_frames == 0
