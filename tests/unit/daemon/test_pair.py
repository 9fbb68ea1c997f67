"""Two real node daemons on loopback (127.0.0.1 / 127.0.0.2): heartbeats, decisions,
scripts, API and events end to end; only the VIP is faked (no root, no interface)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from ha_runtime import api_client
from ha_runtime.config import ConfigError, load_site
from ha_runtime.daemon import NodeDaemon
from ha_runtime.states import State
from tests.sitefactory import (
    Tls,
    free_port,
    module_data,
    pair_daemons,
    prim_scripts,
    wait,
    write_scripts,
    write_site,
)

KEY = b"s" * 48


def _site(tmp: Path, node: str, port: int) -> Path:
    base = tmp / node
    log = tmp / "scripts.log"
    scripts = write_scripts(base, f'echo "$HAPAIR_NODE $HAPAIR_SCRIPT $HAPAIR_TRANSITION" >> {log}')
    return write_site(
        base, node, heartbeat_port=port, site_key=base / "site.key",
        tls=Tls(base / "ca.crt", base / "node.crt", base / "node.key"),
        module=module_data(scripts=prim_scripts(scripts)),
    )  # fmt: skip


def test_pair_first_start_swap_and_failover(tmp_path: Path) -> None:
    port = free_port()
    holders: dict[str, str] = {}
    d1, d2 = pair_daemons(
        (_site(tmp_path, "node1", port), _site(tmp_path, "node2", port)), KEY, holders
    )
    m1, m2 = d1.modules["flightdata"], d2.modules["flightdata"]

    async def call(d: NodeDaemon, req: dict[str, Any]) -> dict[str, Any]:
        return await trio.to_thread.run_sync(api_client.call, d.cluster.api_socket, req)

    async def main() -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(d1.run)
            async with trio.open_nursery() as n2:
                n2.start_soon(d2.run)
                # First start, no history: the default primary takes the role.
                # The state names the role being entered; the VIP follows within it.
                await wait(lambda: m1.state is State.PRIM and m2.state is State.SECOND)
                await wait(lambda: holders == {"flightdata": "node1"})
                status = (await call(d2, {"command": "status"}))["result"]
                assert status["node"] == "node2"
                mod = status["modules"][0]
                assert mod["module"] == "flightdata" and mod["state"] == "SECOND"
                assert mod["peer_state"] == "PRIM" and mod["sync"] == "in-sync"

                # Planned switchover asked on the secondary.
                resp = await call(d2, {"command": "swap", "module": "flightdata"})
                assert resp["ok"], resp
                await wait(lambda: m2.state is State.PRIM and m1.state is State.SECOND)
                await wait(lambda: holders == {"flightdata": "node2"})

                # Swap refused when the peer is not ready: nothing changes.
                await call(d1, {"command": "stop", "module": "flightdata"})
                await wait(lambda: m1.state is State.STOP and m2.state is State.ALONE)
                resp = await call(d2, {"command": "swap", "module": "flightdata"})
                assert not resp["ok"] and "refused" in resp["error"]
                assert m2.state is State.ALONE
                await call(d1, {"command": "start", "module": "flightdata"})
                await wait(lambda: m1.state is State.SECOND and m2.state is State.PRIM)

                n2.cancel_scope.cancel()  # node2 dies without a word...
            holders.pop("flightdata")  # ...and its VIP with it (a crashed node holds nothing)
            # node1 was SECOND in sync: it takes over after the timeout.
            await wait(lambda: m1.state is State.ALONE)
            await wait(lambda: holders == {"flightdata": "node1"})
            events = (await call(d1, {"command": "events", "module": "flightdata"}))["result"]
            assert any(e.get("to") == "ALONE" for e in events)
            outer.cancel_scope.cancel()

    trio.run(main)
    lines = (tmp_path / "scripts.log").read_text().splitlines()
    assert "node1 start_prim WAIT->PRIM" in lines[0] or lines[0].startswith("node1 start_prim")
    assert any(line.startswith("node2 start_prim") for line in lines)
    # Generations persisted: node1 began a new era when it went ALONE.
    saved = json.loads((tmp_path / "node1" / "state" / "flightdata.generation.json").read_text())
    assert saved["peer_outdated"] is True


def test_daemon_refuses_broken_config(tmp_path: Path) -> None:
    path = _site(tmp_path, "node1", 7440)
    mod = path.parent / "modules" / "flightdata.yml"
    mod.write_text(mod.read_text().replace("10.77.0.100/24", "10.77.0.300/24") + "colour: blue\n")
    with pytest.raises(ConfigError) as err:
        load_site(path)
    text = str(err.value)
    assert "vip.address" in text and "colour: unknown field" in text
