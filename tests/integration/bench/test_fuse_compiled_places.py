"""benchmarks/fuse_compiled.py on this host, as root: libfuse's passthrough_fh is built from
Debian's libfuse3-dev example, every place mounts, and a workload's writes land in the
place's own backing directory (not in the mirrored root)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchmarks.fuse_compiled import PLACES, compile_passthrough, place, run_workload


@pytest.mark.parametrize("name", PLACES)
def test_each_place_mounts_and_writes_into_its_backing(name: str, tmp_path: Path) -> None:
    build = tmp_path / "build"
    build.mkdir()
    exe = compile_passthrough(build)
    with place(name, tmp_path, exe) as where:
        assert os.path.ismount(where) == (name != "local")
        got = run_workload(where, "4k_fdatasync", 0.2)
        assert got["ops"] > 0
        (where / "probe").write_bytes(b"x")
        assert (tmp_path / f"{name}-backing" / "probe").read_bytes() == b"x"
    assert not os.path.ismount(tmp_path / f"{name}-mnt")
