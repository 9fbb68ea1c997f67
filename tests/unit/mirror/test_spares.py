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
from ha_runtime.replication.child import role_argv

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


@pytest.mark.parametrize(("role", "prompt"), [("secondary", True), ("primary", False)])
def test_the_refill_waits_only_after_the_primary_role(
    monkeypatch: pytest.MonkeyPatch, role: str, prompt: bool
) -> None:
    """No application starts on a node that took the secondary role: its next spare starts
    at once, ready for a switchover seconds later. After the primary role it waits."""
    monkeypatch.setattr(spares, "REFILL_DELAY_S", 3.0)
    pool = SparePool("m", 1, _echo)
    took: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(pool.run)
            await _until(lambda: 0 in pool.spares)
            proc = await pool.take(0, role)
            assert proc is not None
            t = trio.current_time()
            with trio.move_on_after(1.5):
                await _until(lambda: 0 in pool.spares)
            took.append(trio.current_time() - t)
            got = pool.spares.get(0)
            took.append(float(got is not None))
            n.cancel_scope.cancel()

    trio.run(main)
    if prompt:
        assert took[1] == 1.0 and took[0] < 1.0, took
    else:
        assert took[1] == 0.0, took  # not within 1.5 s of a 3 s delay


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


# Run in a process of its own: the scheduling policies are those of its threads.
POLICIES = """
import os, sys, threading
from ha_runtime.replication import child
assert "ha_runtime.replication.service" not in sys.modules
seen = {}
def spy():
    child_import()
    seen["import"] = (os.sched_getscheduler(0), "ha_runtime.replication.service" in sys.modules)
    print("imported", flush=True)  # the role is sent then, as to a spare started ahead
child_import, child.import_idle = child.import_idle, spy
seen["role"] = child.await_role()
seen["main"] = os.sched_getscheduler(0)
t = threading.Thread(target=lambda: seen.__setitem__("later", os.sched_getscheduler(0)))
t.start(); t.join()
print(seen == {"role": "primary", "import": (os.SCHED_IDLE, True),
               "main": os.SCHED_OTHER, "later": os.SCHED_OTHER}, seen)
"""


def test_a_spare_imports_at_idle_priority_and_runs_its_role_at_ordinary(tmp_path: Path) -> None:
    """A spare is refilled while its node promotes and starts the application: its imports
    run at SCHED_IDLE, in a thread of their own, and take no CPU from that start. The role
    then runs at the ordinary policy, and so do the threads it starts."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3] / "src")}
    with subprocess.Popen(
        [sys.executable, "-c", POLICIES], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env,
    ) as p:  # fmt: skip
        assert p.stdout is not None
        assert p.stdout.readline() == b"imported\n"
        out, err = p.communicate(b'{"cmd": "role", "role": "primary"}\n', timeout=60)
    assert p.returncode == 0 and out.startswith(b"True"), (out, err)


STARVED = """
import sys, time
from ha_runtime.replication import child
child.import_idle = lambda: time.sleep(3600)  # an idle-priority import on a CPU-bound node
sys.orig_argv = [sys.executable, "-m", "ha_runtime.cli", "--config", sys.argv[1],
                 "replicate", "spare", "flightdata"]
print("returned", child.await_role(), flush=True)
"""


def test_a_spare_whose_imports_starve_starts_over_as_its_role(tmp_path: Path) -> None:
    """Given its role before its idle-priority imports are done (the node's CPU is taken),
    a spare does not wait for them: it becomes a fresh child of that role, which reads the
    node file (missing here) at ordinary priority."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3] / "src")}
    r = subprocess.run(
        [sys.executable, "-c", STARVED, str(tmp_path / "none.yml")],
        input=b'{"cmd": "role", "role": "primary"}\n', capture_output=True, timeout=60,
        check=False, env=env,
    )  # fmt: skip
    assert r.returncode == 1 and b"returned" not in r.stdout and b"none.yml" in r.stderr, r


def test_role_argv() -> None:
    spare = ["/usr/bin/python3", "-m", "ha_runtime.cli", "--config", "/c.yml", "replicate",
             "spare", "fd", "--dir", "1"]  # fmt: skip
    assert role_argv(spare, "secondary") == [
        sys.executable, "-m", "ha_runtime.cli", "--config", "/c.yml", "replicate",
        "secondary", "fd", "--dir", "1",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not a spare"):
        role_argv(role_argv(spare, "primary"), "primary")
