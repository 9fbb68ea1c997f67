"""Coverage-guided fuzzing of the secondary's frame reader and session over an in-memory
stream: genuine records, then the fuzzer's bytes (half the time as an authenticated frame),
then EOF. `python tests/fuzz/fuzz_transport.py -runs=N`."""

from __future__ import annotations

import sys
from typing import Any

import atheris
import trio
import trio.testing

with atheris.instrument_imports(include=["ha_runtime"]):
    from ha_runtime.replication import journal as J
    from ha_runtime.replication.link.framing import Conn
    from ha_runtime.replication.link.secondary import SecondarySession

KEY = J.derive_key(b"t" * 48)
GOOD = [J.Record(i, J.Op.WRITE, b"f", offset=i, data=b"x") for i in (1, 2)]
PREFIX = b"".join(J.record_frame(r, KEY) for r in GOOD)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 8)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    tail = J.encode_frame(J.Kind(kind), raw, KEY) if kind else raw
    applied: list[J.Record] = []
    rejected: list[str] = []

    async def barrier() -> int:
        return applied[-1].seq if applied else 0

    async def control(obj: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        return {}, b""

    async def main() -> None:
        peer, ours = trio.testing.memory_stream_pair()
        s = SecondarySession(
            Conn(ours, KEY, "node1"), applied.append, barrier, control,
            on_rejected=rejected.append,
        )  # fmt: skip
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(s.run)
                await peer.send_all(PREFIX + tail)
                await peer.send_stream.aclose()

    trio.run(main)
    assert applied[:2] == GOOD
    assert len(rejected) <= 1
    if kind != J.Kind.RECORD:
        assert applied == GOOD  # nothing but an authenticated, valid RECORD is applied


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
