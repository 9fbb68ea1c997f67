"""The supervisor <-> replication child line protocol (ha_runtime.jsonlines)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from ha_runtime.jsonlines import json_objects


def _read(chunks: list[bytes]) -> list[dict[str, Any]]:
    async def main() -> list[dict[str, Any]]:
        send, receive = trio.testing.memory_stream_one_way_pair()
        for chunk in chunks:
            await send.send_all(chunk)
        await send.aclose()
        return [m async for m in json_objects(receive)]

    return trio.run(main)


def test_objects_split_across_chunks_are_read_whole() -> None:
    assert _read([b'{"type": "sta', b'tus"}\n{"a"', b": 1}\n"]) == [{"type": "status"}, {"a": 1}]


def test_torn_foreign_and_non_object_lines_are_skipped_not_fatal() -> None:
    lines = [b"not json\n", b"[1, 2]\n", b'"text"\n', b'{"ok": true}\n', b'{"cut": ']
    assert _read(lines) == [{"ok": True}]
