"""Opening API sockets never leaves the process umask changed (it is process-wide)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import trio

from ha_runtime import api


def test_concurrent_listeners_restore_the_umask(tmp_path: Path) -> None:
    before = os.umask(0o022)
    try:

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(api.open_listener, tmp_path / f"s{i}" / "api.sock")

        trio.run(main)
        assert os.umask(0o022) == 0o022
        for i in range(4):
            mode = stat.S_IMODE((tmp_path / f"s{i}" / "api.sock").stat().st_mode)
            assert mode == 0o600
    finally:
        os.umask(before)
