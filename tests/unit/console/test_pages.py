"""The pair page from status entries shaped like the daemons' (mirror and farm): the peer
unreachable, a three-node farm, and hostile text escaped."""

from __future__ import annotations

import re
from typing import Any

from ha_runtime.console import pages

MIRROR: dict[str, Any] = {
    "module": "fd", "type": "mirror", "node": "node1", "state": "PRIM", "peer": "node2",
    "peer_state": "SECOND", "peer_alive": True, "peer_networks": ["lan"], "vip": "10.0.0.9/24",
    "vip_held": True, "generation": "0a0a0a0a", "peer_generation": "0a0a0a0a", "data": "same",
    "checkers": [], "reason": "node2 is SECOND and in sync", "replication": None,
}  # fmt: skip


def _render(local: list[dict[str, Any]], peers: dict[str, Any], errors: list[str]) -> str:
    return pages.pair_page(
        node="node1",
        local={"node": "node1", "networks": ["lan"], "modules": local},
        peers=peers,
        peer_errors=errors,
        events=[{"time": "t", "module": "fd", "event": "transition", "reason": "<b>x</b>"}],
        user="ops",
        role="viewer",
        csrf="tok",
    ).decode()


def test_peer_console_unreachable_falls_back_to_heartbeats() -> None:
    html = _render([MIRROR], {}, ["node2 at 10.79.0.12:8443: Connection refused"])
    assert "Peer console not reachable: node2 at 10.79.0.12:8443: Connection refused" in html
    assert re.search(r"<td class=node>node2</td><td><span class=\"st ok\">SECOND</span>", html)
    assert "from heartbeats (console of this node not reachable)" in html
    assert "<span class=vip-holder>node1</span>" in html
    assert "<form" not in html.split("<header>")[1].split("</header>")[1]  # viewer: no action


def test_three_node_farm_rows_and_holders() -> None:
    farm = {
        **MIRROR, "module": "weather", "type": "farm", "state": "UP", "peer": "node2,node3",
        "peer_state": "node2=UP,node3=LOST", "peer_networks": {"node2": ["lan"], "node3": []},
        "drained": False,
    }  # fmt: skip
    node2 = {"modules": [{**farm, "node": "node2", "peer": "node1,node3", "vip_held": True}]}
    html = _render([farm], {"node2": node2}, ["node3 at 10.79.0.13:8443: timed out"])
    assert re.findall(r"<td class=node>(node\d)</td>", html) == ["node1", "node2", "node3"]
    assert "<span class=vip-holder>node1, node2</span>" in html
    assert "node2: lan, node3: none" in html
    assert 'class="st bad">LOST<' in html


def test_hostile_text_is_escaped() -> None:
    evil = {**MIRROR, "reason": "<script>alert(1)</script>", "module": 'fd"><img src=x>'}
    html = _render([evil], {}, [])
    assert "<script>" not in html and "<img src=x>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "reason=&lt;b&gt;x&lt;/b&gt;" in html
