"""Forged and replayed heartbeats sent to a live node are counted and change nothing.

A heartbeat really sent by node2 is captured on node1's LAN interface, then sent again
from the client namespace on the LAN: as is (a replay), with its MAC altered (forged),
and a packet made up to claim node2 is primary with a newer data generation, signed with
a key that is not the site's (forged). node1 must count each in `hactl status --json`
and in its Prometheus metrics, and the pair must stay exactly as it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from typing import Any

from labcmd import in_node

from ha_lab import topology
from ha_lab.lab import Lab
from ha_runtime.heartbeat.packet import Heartbeat, decode, encode
from ha_runtime.states import Flag, State

NODE1_LAN = "10.77.0.11"
NODE2_LAN = "10.77.0.12"
HB_PORT = 7440
TIMES = 5

# Runs in node1's network namespace: the payload of one UDP datagram node2 -> node1:7440.
CAPTURE = f"""
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind(("lan0", 0))
s.settimeout(10)
while True:
    frame = s.recv(4096)
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    if ip[9] != 17 or socket.inet_ntoa(ip[12:16]) != "{NODE2_LAN}":
        continue
    sport, dport, length = struct.unpack("!HHH", ip[ihl:ihl + 6])
    if dport == {HB_PORT}:
        sys.stdout.write(ip[ihl + 8:ihl + length].hex())
        break
"""

# Runs in the client namespace: send each hex payload to node1's heartbeat port.
SEND = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for line in sys.stdin.read().split():
    s.sendto(bytes.fromhex(line), ("{NODE1_LAN}", {HB_PORT}))
"""


def _status(lab: Lab) -> dict[str, Any]:
    proc = in_node(lab, "node1", "hactl", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def _module(status: dict[str, Any]) -> dict[str, Any]:
    return next(m for m in status["modules"] if m["module"] == "flightdata")


def _metric(reason: str) -> float:
    text = urllib.request.urlopen("http://10.79.0.11:9440/metrics", timeout=5).read().decode()
    prefix = f'hapair_heartbeat_dropped_total{{reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def _capture() -> bytes:
    proc = subprocess.run(
        ["ip", "netns", "exec", topology.node_ns("node1"), sys.executable, "-c", CAPTURE],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    return bytes.fromhex(proc.stdout)


def _send(packets: list[bytes]) -> None:
    subprocess.run(
        Lab.client_argv([sys.executable, "-c", SEND]),
        input="\n".join(p.hex() for p in packets), text=True, timeout=30, check=True,
    )  # fmt: skip


def test_forged_and_replayed_heartbeats_are_counted_and_ignored(mirror_site: Lab) -> None:
    captured = _capture()
    before = _status(mirror_site)
    state = _module(before)["state"]
    assert {state, _module(before)["peer_state"]} == {"PRIM", "SECOND"}, _module(before)
    metrics_before = {r: _metric(r) for r in ("forged", "replayed")}
    sent_at = time.time()

    forged_mac = captured[:-1] + bytes([captured[-1] ^ 0xFF])
    # A made-up takeover: node2 claims to be primary with a far newer generation.
    takeover = encode(
        Heartbeat(
            node="node2", module="flightdata", network="lan", state=State.PRIM,
            flags=Flag.ELIGIBLE, incarnation=time.time_ns() * 2, seq=1, generation=2**62,
        ),
        b"not the site key, but just as long as one: 0123456789",
    )  # fmt: skip
    assert decode(takeover, b"another key of 32 bytes or more........") == "forged"
    _send([captured] * TIMES + [forged_mac] * TIMES + [takeover] * TIMES)
    time.sleep(1.5)  # more than the detection timeout: a takeover would have happened

    after = _status(mirror_site)
    drops_before, drops_after = before["heartbeat_drops"], after["heartbeat_drops"]
    assert drops_after.get("replayed", 0) - drops_before.get("replayed", 0) == TIMES, drops_after
    assert drops_after.get("forged", 0) - drops_before.get("forged", 0) == 2 * TIMES, drops_after
    assert _metric("replayed") - metrics_before["replayed"] == TIMES
    assert _metric("forged") - metrics_before["forged"] == 2 * TIMES

    mod = _module(after)
    assert mod["state"] == state, mod
    assert mod["peer_state"] == _module(before)["peer_state"] and mod["peer_alive"], mod
    assert mod["generation"] == _module(before)["generation"], mod
    node2 = json.loads(in_node(mirror_site, "node2", "hactl", "status", "--json").stdout)
    assert _module(node2)["state"] == _module(before)["peer_state"], node2
    # Visible in the audit log, once per reason (a flood does not write a line per packet),
    # and nothing else happened: no transition.
    out = in_node(mirror_site, "node1", "hactl", "events", "flightdata", "--json").stdout
    new = [e for e in json.loads(out) if float(e.get("ts", 0)) >= sent_at]
    # (a "replayed" line may have been written, and so be held back, in the 10 s before)
    assert 1 <= len(new) <= 2, new
    assert all(e["event"] == "heartbeat_refused" for e in new), new
    assert any(e["reason"] == "forged" and e["count"] >= 1 for e in new), new
