"""Spare replication children (mirror.spares) and the spare side of `hactl replicate`.

The pool runs real processes: a small stand-in that echoes the role line it is given, so
the pool's hand-over, refill and clean-up are checked without FUSE or a peer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from ha_runtime.mirror import spares
from ha_runtime.mirror.spares import SparePool

# Stands in for `hactl replicate spare`: waits for its first line, echoes it, then lives
# until its stdin closes (as a real child does).
ECHO = "import sys; sys.stdout.write(sys.stdin.readline()); sys.stdout.flush(); sys.stdin.read()"


def _echo(index: int) -> list[str]:
    return [sys.executable, "-c", ECHO, str(index)]


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


async def _until(pred: object, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():  # type: ignore[operator]
            await trio.sleep(0.02)


def test_a_spare_takes_its_role_and_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spares, "REFILL_DELAY_S", 0.05)
    pool = SparePool("m", 2, _echo)
    seen: dict[str, object] = {}

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(pool.run)
            await _until(lambda: len(pool.spares) == 2)
            first = seen["first"] = pool.spares[1].pid
            proc = await pool.take(1, "secondary")
            assert proc is not None and proc.pid == first
            assert proc.stdout is not None
            seen["line"] = await proc.stdout.receive_some(200)
            await _until(lambda: 1 in pool.spares)  # refilled after the delay
            seen["next"] = pool.spares[1].pid
            assert proc.stdin is not None
            await proc.stdin.aclose()
            await proc.wait()
            seen["others"] = [p.pid for p in pool.spares.values()]
            n.cancel_scope.cancel()

    trio.run(main)
    assert seen["line"] == b'{"cmd": "role", "role": "secondary"}\n'
    assert seen["next"] != seen["first"]
    assert pool.spares == {}
    for pid in seen["others"]:  # type: ignore[attr-defined]
        assert not _alive(pid), f"spare {pid} outlived its pool"


def test_a_dead_spare_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spares, "REFILL_DELAY_S", 0.05)
    pool = SparePool("m", 1, lambda i: [sys.executable, "-c", "pass"])
    got: list[object] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(pool.run)
            await _until(lambda: 0 in pool.spares)
            await _until(lambda: pool.spares[0].returncode is not None)
            got.append(await pool.take(0, "primary"))
            n.cancel_scope.cancel()

    trio.run(main)
    assert got == [None]


def test_a_pool_that_cannot_start_spares_keeps_going(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = SparePool("m", 1, lambda i: ["/nonexistent/hactl"])
    got: list[object] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(pool.run)
            await trio.sleep(0.1)
            got.append(await pool.take(0, "primary"))  # the caller starts a child itself
            n.cancel_scope.cancel()

    trio.run(main)
    assert got == [None]


def _spare(stdin: bytes, tmp_path: Path) -> subprocess.CompletedProcess[bytes]:
    # The node file is read only once the role is known: none is needed for these cases.
    argv = [sys.executable, "-m", "ha_runtime.cli", "--config", str(tmp_path / "none.yml")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3] / "src")}
    return subprocess.run(
        [*argv, "replicate", "spare", "flightdata"], input=stdin, capture_output=True,
        timeout=60, check=False, env=env,
    )  # fmt: skip


def test_a_spare_dropped_before_use_exits_quietly(tmp_path: Path) -> None:
    r = _spare(b"", tmp_path)
    assert (r.returncode, r.stderr) == (0, b"")


@pytest.mark.parametrize(
    ("line", "said"),
    [
        (b"hello\n", b"the first line is not JSON"),
        (b'{"cmd": "role", "role": "witness"}\n', b'expected {"cmd": "role"'),
        (b'{"cmd": "stop"}\n', b'expected {"cmd": "role"'),
    ],
)
def test_a_spare_refuses_anything_but_a_role(line: bytes, said: bytes, tmp_path: Path) -> None:
    r = _spare(line, tmp_path)
    assert r.returncode == 1 and said in r.stderr, r


def test_a_spare_given_a_role_reads_the_node_file_then(tmp_path: Path) -> None:
    r = _spare(b'{"cmd": "role", "role": "secondary"}\n', tmp_path)
    assert r.returncode == 1 and b"none.yml" in r.stderr, r
