"""The runtime role's optional firewall (hapair_runtime_firewall) applied on the lab's nodes.

deploy.yml with the firewall on (the lab inventory, `-e hapair_runtime_firewall=true`) loads
the table `inet hapair` on both nodes without restarting hapair. On the real nodes: the
input chain holds exactly the runtime's rules (policy drop); from the lab's client
namespace the modules' services answer through their VIPs (flightdata, and weather from
both nodes) while a port that is not the runtime's is dropped (weather's socket on a
node's own LAN address, a closed port, the replication port to a client); the metrics and
console answer the controller on the management network. Heartbeats stay authenticated
on both networks and replication in sync; the table comes back when its unit restarts; a
switchover and back still moves the VIP (the client sees the new primary); after a power
cut of the secondary the table is loaded at boot and the node resyncs through it; a
second deploy changes nothing. Then deploy.yml with the firewall off (`--tags firewall`) removes
the table and its unit, and the node's other ports answer again: the lab is left as found
(a finalizer does the same if the test stops half way).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from labcmd import in_node
from repl import in_sync_pair
from siteplay import PlaybookResult, run_playbook

from ha_lab.lab import Lab
from ha_lab.observe import Probe, wait_for_states

NODES = ("node1", "node2")
FLIGHTDATA_VIP = "10.77.0.100"
WEATHER_VIP = "10.77.0.200"
ON = {"hapair_runtime_firewall": True}
OFF = {"hapair_runtime_firewall": False}
NOT_RUNTIME_PORT = 9  # nothing listens there: refused without the firewall

# Connects once and says how: "open", "refused" (a RST) or "timeout" (dropped).
CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("open")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
"""


def _address(net: str, node: str) -> str:
    """Lab convention (docs/lab-contract.md): node k is .1k on every network."""
    prefix = {"mgmt": "10.79.0", "lan": "10.77.0", "hb": "10.78.0"}[net]
    return f"{prefix}.1{node.removeprefix('node')}"


def _from_client(lab: Lab, host: str, port: int, timeout: float = 1.0) -> str:
    argv = Lab.client_argv([sys.executable, "-c", CONNECT, host, str(port), str(timeout)])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _from_controller(host: str, port: int, timeout: float = 1.0) -> str:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"


def _expected_rules(node: str) -> list[str]:
    """The input chain on a lab node, as `nft list chain` prints it."""
    peer = next(n for n in NODES if n != node)
    mgmt = _address("mgmt", node)
    return [
        "type filter hook input priority filter - 10; policy drop;",
        'iif "lo" accept',
        "ct state established,related accept",
        # icmp, igmp, icmpv6: numbers, the lab's image has no /etc/protocols to name them.
        "meta l4proto { 1, 2, 58 } accept",
        "tcp dport 22 accept",
        f"udp dport 7440 ip daddr {{ {_address('lan', node)}, {_address('hb', node)} }} accept",
        f"tcp dport 7441 ip saddr {{ {_address('lan', peer)}, {_address('hb', peer)} }} accept",
        f"tcp dport 9440 ip daddr {mgmt} accept",
        f"tcp dport 8443 ip daddr {mgmt} accept",
        f"tcp dport 8080 ip daddr {FLIGHTDATA_VIP} accept",
        f"tcp dport 8080 ip daddr {WEATHER_VIP} accept",
    ]


def _rules(lab: Lab, node: str) -> list[str] | None:
    """The rules of the table's input chain on the node; None when there is no table."""
    proc = in_node(lab, node, "nft", "list", "chain", "inet", "hapair", "input")
    if proc.returncode != 0:
        return None
    lines = [line.strip() for line in proc.stdout.splitlines()]
    return [line for line in lines if line and not line.startswith(("table", "chain", "}"))]


def _status(lab: Lab, node: str) -> dict[str, Any]:
    proc = in_node(lab, node, "hactl", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def _started_at(lab: Lab, node: str) -> str:
    proc = in_node(lab, node, "systemctl", "show", "-p", "ActiveEnterTimestampMonotonic", "hapair")
    return proc.stdout.strip()


def _changed(result: PlaybookResult) -> list[str]:
    return [f"{e.get('host')}: {e.get('task')}" for e in result.changed]


def _firewall_off() -> PlaybookResult:
    # The firewall tasks only (validation runs with every tag): quick, and enough to undo.
    return run_playbook("playbooks/deploy.yml", extravars=OFF, cmdline="--tags firewall")


@pytest.fixture
def firewalled_site(mirror_site: Lab) -> Iterator[Lab]:
    """The deployed lab; the firewall off again afterwards, whatever happened (shared lab)."""
    yield mirror_site
    if any(_rules(mirror_site, n) is not None for n in NODES):
        off = _firewall_off()
        assert off.status == "successful", off.failure_summary()


def _swap(lab: Lab, probe: Probe, old: str, new: str) -> float:
    """hactl swap on the primary; the client sees `new` answer through the VIP."""
    asked = time.monotonic()
    proc = in_node(lab, old, "hactl", "swap", "flightdata", timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    states = wait_for_states("flightdata", {new: "PRIM", old: "SECOND"}, timeout=60)
    assert states == {new: "PRIM", old: "SECOND"}, states
    served = probe.wait_served_by(new, after=asked, timeout=30)
    assert served is not None, f"the client never got an answer from {new} through the VIP"
    return served - asked


def _check_firewall_on(lab: Lab) -> None:
    """The unit and the table on each node: exactly the runtime's rules."""
    for node in NODES:
        for query in ("is-active", "is-enabled"):
            proc = in_node(lab, node, "systemctl", query, "hapair-firewall.service")
            assert proc.stdout.strip() in {"active", "enabled"}, f"{node} {query}: {proc.stdout}"
        assert _rules(lab, node) == _expected_rules(node), f"{node}: {_rules(lab, node)}"


def _check_reachability(lab: Lab, flightdata: Probe, since: float) -> None:
    """The services through their VIPs, from the client namespace: flightdata from its
    primary, weather from both nodes (its buckets spread the client's connections); the
    nodes' other ports dropped; SSH, metrics and console open to the controller."""
    weather_probe = Probe(WEATHER_VIP, duration=3).start()
    for node in NODES:
        lan = _address("lan", node)
        seen = {p: _from_client(lab, lan, p) for p in (8080, NOT_RUNTIME_PORT, 7441, 22)}
        print(f"client -> {lan}: {seen}")
        assert seen == {8080: "timeout", NOT_RUNTIME_PORT: "timeout", 7441: "timeout", 22: "open"}
        mgmt = _address("mgmt", node)
        assert _from_controller(mgmt, 8443) == "open", f"console of {node}"
        with urllib.request.urlopen(f"http://{mgmt}:9440/metrics", timeout=5) as response:
            assert response.status == 200, f"metrics of {node}"
    time.sleep(3)
    weather = {s.node for s in weather_probe.stop() if s.node}
    assert weather == set(NODES), f"weather through its VIP answered from {weather}"
    assert flightdata.wait_served_by("node1", after=since, timeout=5) is not None


def _check_heartbeats(lab: Lab, forged_before: dict[str, int]) -> None:
    """Every module hears its peer on both networks, and no heartbeat was refused as forged."""
    for node in NODES:
        status = _status(lab, node)
        for module in status["modules"]:
            assert module["peer_alive"], f"{node} {module['module']}: {module}"
            # A mirror module lists its peer's networks, a farm module each member's.
            heard = module["peer_networks"]
            for networks in heard.values() if isinstance(heard, dict) else [heard]:
                assert sorted(networks) == ["hb", "lan"], f"{node}: {module}"
        assert status["heartbeat_drops"].get("forged", 0) == forged_before[node], status


def test_firewall_opens_exactly_the_runtime_ports(firewalled_site: Lab) -> None:
    lab = firewalled_site
    started = time.monotonic()
    in_sync_pair(120)
    # Without the firewall, weather's socket on node1's own LAN address answers and a
    # closed port refuses: what the firewall must change.
    assert _from_client(lab, _address("lan", "node1"), 8080) == "open"
    assert _from_client(lab, _address("lan", "node1"), NOT_RUNTIME_PORT) == "refused"
    forged_before = {n: _status(lab, n)["heartbeat_drops"].get("forged", 0) for n in NODES}
    hapair_since = {n: _started_at(lab, n) for n in NODES}

    on = run_playbook("playbooks/deploy.yml", extravars=ON)
    assert on.status == "successful", on.failure_summary()
    print(f"deploy.yml with the firewall: changed {_changed(on)}")
    assert {_started_at(lab, n) for n in NODES} == set(hapair_since.values()), "hapair restarted"
    _check_firewall_on(lab)

    flightdata = Probe(FLIGHTDATA_VIP, duration=300).start()
    try:
        _check_reachability(lab, flightdata, started)
        in_sync_pair(120)
        _check_heartbeats(lab, forged_before)

        # The table comes back when its unit restarts (as at boot: the unit is enabled).
        restarted = in_node(lab, "node1", "systemctl", "restart", "hapair-firewall.service")
        assert restarted.returncode == 0, restarted.stderr
        assert _rules(lab, "node1") == _expected_rules("node1")

        # A switchover and back: the VIP moves through the firewall, the client follows.
        gaps = [_swap(lab, flightdata, "node1", "node2")]
        in_sync_pair(120)
        gaps.append(_swap(lab, flightdata, "node2", "node1"))
    finally:
        flightdata.stop()
    print(f"switchover and back: the client reached the new primary after {gaps} s")
    in_sync_pair(120)

    # A power cut of the secondary: at boot the unit loads the table before hapair starts,
    # and the node is SECOND in sync again behind it.
    lab.crash("node2")
    booted = time.monotonic()
    lab.boot("node2")
    _check_firewall_on(lab)
    in_sync_pair(120)
    print(f"node2 power cycled: back in sync {time.monotonic() - booted:.0f} s after boot")
    _check_heartbeats(lab, {**forged_before, "node2": 0})  # its counters restarted

    again = run_playbook("playbooks/deploy.yml", extravars=ON)
    assert again.status == "successful", again.failure_summary()
    print(f"second deploy.yml with the firewall: changed {_changed(again)}")
    assert _changed(again) == []

    off = _firewall_off()
    assert off.status == "successful", off.failure_summary()
    for node in NODES:
        assert _rules(lab, node) is None, f"{node} still has the table"
        gone = in_node(lab, node, "systemctl", "cat", "hapair-firewall.service")
        assert gone.returncode != 0, f"{node} still has hapair-firewall.service"
    assert _from_client(lab, _address("lan", "node1"), 8080) == "open"
    assert _from_client(lab, _address("lan", "node1"), NOT_RUNTIME_PORT) == "refused"
    print(f"firewall lab test: {time.monotonic() - started:.0f} s")
