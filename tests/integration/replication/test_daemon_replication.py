"""Two node daemons on loopback with a replicated directory (root + /dev/fuse, this host).

The daemon-level wiring: the primary mounts the directory in a child process before
starting the application, the secondary receives into its backing directory and adopts the
primary's generation only once in sync (PRIM/SECOND), `hactl verify` equal, a planned swap
drains and moves the mount, and a peer lost and back resyncs incrementally. Each node has
its own application directory (one host), only the VIP is faked."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from ha_runtime import api_client
from ha_runtime.config import load_site
from ha_runtime.daemon import NodeDaemon
from ha_runtime.replication.child import mounted
from ha_runtime.replication.link.framing import LinkLost
from ha_runtime.replication.link.tls import client_context, connect
from ha_runtime.states import State
from tests.sitefactory import (
    Tls,
    free_port,
    free_tcp_port,
    module_data,
    pair_daemons,
    prim_scripts,
    write_key,
    write_scripts,
    write_site,
)

_spec = importlib.util.spec_from_file_location(
    "replication_pki", Path(__file__).parents[2] / "unit/replication/conftest.py"
)
assert _spec and _spec.loader
_pki = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pki)

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="root+FUSE"),
]

KEY = b"k" * 48


def _site(tmp: Path, node: str, hb_port: int, repl_port: int) -> Path:
    base = tmp / node
    if node == "node1":
        _pki.make_site(tmp / "pki", "a", ("node1", "node2"))
    app = base / "app"
    log = tmp / "scripts.log"
    # The "application" checks that it is started on the mounted directory.
    scripts = write_scripts(
        base,
        f'grep -q " {app} fuse" /proc/self/mounts && m=mounted || m=unmounted\n'
        f'echo "$HAPAIR_NODE $HAPAIR_SCRIPT $m" >> {log}',
    )
    replication = {"port": repl_port, "timeout_ms": 1000, "networks": ["lan"]}
    module = module_data(
        scripts=prim_scripts(scripts), replicated_dirs=[app], replication=replication
    )
    return write_site(
        base, node, heartbeat_port=hb_port, site_key=write_key(base / "site.key", KEY),
        tls=Tls.of(tmp / "pki", node), module=module,
    )  # fmt: skip


MANAGERS: list[Any] = []


async def _wait(pred: Any, timeout: float = 30) -> None:
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timeout; now {[m.status() for m in MANAGERS]}")


def _write_sync(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_daemons_replicate_swap_and_resync(tmp_path: Path) -> None:  # noqa: PLR0915
    hb, rp = free_port(), free_tcp_port()
    holders: dict[str, str] = {}
    sites = [load_site(_site(tmp_path, n, hb, rp)) for n in ("node1", "node2")]
    d1, d2 = pair_daemons((sites[0], sites[1]), KEY, holders)
    m1, m2 = d1.modules["flightdata"], d2.modules["flightdata"]
    MANAGERS[:] = [m1, m2]
    app1, app2 = tmp_path / "node1" / "app", tmp_path / "node2" / "app"
    back1 = tmp_path / "node1" / "state" / "replica" / "flightdata" / "0"
    back2 = tmp_path / "node2" / "state" / "replica" / "flightdata" / "0"

    async def call(d: NodeDaemon, req: dict[str, Any]) -> dict[str, Any]:
        return await trio.to_thread.run_sync(api_client.call, d.cluster.api_socket, req)

    def pair(prim: Any, sec: Any) -> bool:
        return (
            prim.state is State.PRIM
            and sec.state is State.SECOND
            and sec.status()["sync"] == "in-sync"
        )

    spares_seen: list[int | None] = []

    async def main() -> None:  # noqa: PLR0915 - one scenario, step by step
        async with trio.open_nursery() as outer:
            outer.start_soon(d1.run)
            async with trio.open_nursery() as n2:
                n2.start_soon(d2.run)
                await _wait(lambda: pair(m1, m2))
                assert mounted(app1) and not mounted(app2)
                await trio.to_thread.run_sync(_write_sync, app1 / "a.txt", b"hello\n")
                assert (back2 / "a.txt").read_bytes() == b"hello\n"  # fsync returned: on node2
                v = (await call(d1, {"command": "verify", "module": "flightdata"}))["result"]
                assert v["equal"], v
                st = (await call(d1, {"command": "status", "module": "flightdata"}))["result"]
                rep = st["modules"][0]["replication"]
                assert rep["role"] == "primary" and rep["in_sync"], rep

                # A replication peer with another site's certificate: refused, in the events.
                foreign = _pki.make_site(tmp_path / "other-site", "b", ("node1", "node2"))
                with pytest.raises(LinkLost):
                    await connect(
                        addresses=[("127.0.0.2", rp)], peer="node2",
                        ctx=client_context(foreign["node1"]), key=KEY, timeout=2,
                    )  # fmt: skip
                refused: list[dict[str, Any]] = []

                async def refusal_logged() -> bool:
                    ev = (await call(d2, {"command": "events", "module": "flightdata"}))["result"]
                    refused[:] = [e for e in ev if e.get("kind") == "link_refused"]
                    return bool(refused)

                with trio.move_on_after(10):
                    while not await refusal_logged():
                        await trio.sleep(0.1)
                assert refused and "TLS handshake refused" in refused[-1]["reason"], refused
                assert pair(m1, m2)  # the genuine link was not disturbed

                # Planned swap: drained, unmounted on node1, mounted on node2, each by the
                # spare child its daemon started ahead (no interpreter started meanwhile).
                await _wait(lambda: all(_spare_pid(m) is not None for m in (m1, m2)))
                spare1, spare2 = _spare_pid(m1), _spare_pid(m2)
                spares_seen.extend([spare1, spare2])
                resp = await call(d1, {"command": "swap", "module": "flightdata"})
                assert resp["ok"], resp
                await _wait(lambda: pair(m2, m1))
                assert _child_pid(m2) == spare2 and _child_pid(m1) == spare1, (
                    (spare1, spare2),
                    (_child_pid(m1), _child_pid(m2)),
                )
                assert mounted(app2) and not mounted(app1)
                assert (app2 / "a.txt").read_bytes() == b"hello\n"
                await trio.to_thread.run_sync(_write_sync, app2 / "b.txt", b"from node2\n")
                assert (back1 / "b.txt").read_bytes() == b"from node2\n"

                # node1 stops: node2 goes ALONE and keeps writing (dirty log).
                await call(d1, {"command": "stop", "module": "flightdata"})
                await _wait(lambda: m2.state is State.ALONE)
                await trio.to_thread.run_sync(_write_sync, app2 / "c.txt", b"while alone\n")
                assert not (back1 / "c.txt").exists()
                await call(d1, {"command": "start", "module": "flightdata"})
                await _wait(lambda: pair(m2, m1))
                assert (back1 / "c.txt").read_bytes() == b"while alone\n"
                events = (await call(d2, {"command": "events", "module": "flightdata"}))["result"]
                kinds = [e.get("kind") for e in events if e.get("event") == "replication"]
                assert "resync_done" in kinds
                full = [e for e in events if e.get("kind") == "resync_started"]
                assert full and full[-1]["full"] is False, full  # only the changes travelled
                v = (await call(d2, {"command": "verify", "module": "flightdata"}))["result"]
                assert v["equal"], v
                n2.cancel_scope.cancel()
            outer.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for p in (app1, app2):
            if mounted(p):
                subprocess.run(["umount", "-l", str(p)], check=False)
    lines = (tmp_path / "scripts.log").read_text().splitlines()
    assert all(line.endswith(" mounted") for line in lines if "start_prim" in line), lines
    # The daemons gone, no spare outlives them (a used one was a child and stopped as one).
    left = [m.replication.spares.spares for m in (m1, m2) if m.replication and m.replication.spares]
    assert left == [{}, {}], left
    for pid in spares_seen:
        assert pid is not None and not Path(f"/proc/{pid}").exists(), pid


def _spare_pid(m: Any) -> int | None:
    """The pid of the module's live spare child of directory 0, if any."""
    p = m.replication.spares.spares.get(0)
    return p.pid if p is not None and p.returncode is None else None


def _child_pid(m: Any) -> int | None:
    c = m.replication.children.get(0)
    return c.proc.pid if c is not None and c.proc is not None else None
