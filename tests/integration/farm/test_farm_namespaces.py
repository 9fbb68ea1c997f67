"""The farm engine end to end on a bridge of namespaces: ARP, split, loss, return, power."""

from __future__ import annotations

import json
import time

from farmnet import VIP, FarmNet, sh

EQUAL = [("n1", 1), ("n2", 1)]


def report(what: str, result: dict[str, object]) -> None:
    print(f"farm figure: {what}: {json.dumps(result, sort_keys=True)}")


def share(result: dict[str, object], node: str) -> float:
    answers = result["answers"]
    assert isinstance(answers, dict)
    return float(answers.get(node, 0)) / sum(answers.values())


def test_two_nodes_split_loss_and_return(farm_net: FarmNet) -> None:
    farm_net.build(["n1", "n2"])
    farm_net.start("n1", EQUAL)
    farm_net.start("n2", EQUAL)
    farm_net.tell(["n1", "n2"])

    result = farm_net.spread(200)

    report("200 connections", result)
    assert result["failures"] == 0, result
    assert 0.35 <= share(result, "n1") <= 0.65, result

    # The client learnt the virtual MAC, not a node's own MAC.
    neigh = sh("ip", "-n", farm_net.client, "neigh", "show", VIP).stdout
    assert "01:00:5e:7f:00:c8" in neigh, neigh

    status = farm_net.agents["n1"].cmd(op="status")
    assert status["state"] == "UP"
    assert {m["node"]: m["buckets"] for m in status["members"]} == {"n1": 128, "n2": 128}
    assert status["connections_served"] == result["answers"]["n1"]

    # Crash n2: once the survivor knows, every request lands on it.
    farm_net.crash("n2")
    farm_net.tell(["n1"])
    result = farm_net.spread(200)
    report("200 connections", result)
    assert result == {"answers": {"n1": 200}, "failures": 0}


def test_return_keeps_survivor_connections(farm_net: FarmNet) -> None:
    farm_net.build(["n1", "n2"])
    farm_net.start("n1", EQUAL)
    farm_net.start("n2", EQUAL)
    farm_net.tell(["n1", "n2"])
    farm_net.crash("n2")
    farm_net.tell(["n1"])

    # Connections opened while n1 is alone: about half of them hash into n2's buckets.
    held = farm_net.hold(40)
    try:
        assert held.stdout is not None and held.stdin is not None
        first = json.loads(held.stdout.readline())
        assert set(first["answers"]) == {"n1"}, first

        # n2 boots and takes its buckets back.
        farm_net.boot("n2")
        farm_net.start("n2", EQUAL)
        farm_net.tell(["n1", "n2"])
        assert farm_net.agents["n2"].cmd(op="status")["my_buckets"] == 128

        # Every connection held on the survivor still works, and still on the survivor.
        for _ in range(3):
            held.stdin.write("again\n")
            held.stdin.flush()
            after = json.loads(held.stdout.readline())
            assert after["answers"] == ["n1"] * 40, after
    finally:
        held.kill()
        held.wait()
    # New connections are shared again.
    result = farm_net.spread(200)
    report("200 connections", result)
    assert result["failures"] == 0, result
    assert 0.35 <= share(result, "n2") <= 0.65, result
    # n2 dropped the survivor's packets silently: it sent no reset.
    assert farm_net.agents["n2"].cmd(op="status")["foreign_packets"] > 0


def test_power_three_to_one(farm_net: FarmNet) -> None:
    powers = [("n1", 3), ("n2", 1)]
    farm_net.build(["n1", "n2"])
    farm_net.start("n1", powers)
    farm_net.start("n2", powers)
    farm_net.tell(["n1", "n2"])
    result = farm_net.spread(400)
    report("400 connections", result)
    assert result["failures"] == 0, result
    assert 0.65 <= share(result, "n1") <= 0.85, result


def test_three_nodes_loss_and_drain(farm_net: FarmNet) -> None:
    nodes = [("n1", 1), ("n2", 1), ("n3", 1)]
    farm_net.build(["n1", "n2", "n3"])
    for name, _ in nodes:
        farm_net.start(name, nodes)
    farm_net.tell(["n1", "n2", "n3"])
    result = farm_net.spread(300)
    report("300 connections", result)
    assert result["failures"] == 0, result
    for name, _ in nodes:
        assert 0.20 <= share(result, name) <= 0.47, result

    farm_net.crash("n3")
    farm_net.tell(["n1", "n2"])
    result = farm_net.spread(200)
    report("200 connections", result)
    assert result["failures"] == 0 and set(result["answers"]) == {"n1", "n2"}, result

    # Draining n1 (maintenance) sends everything new to n2.
    reply = farm_net.agents["n1"].cmd(op="drain")
    assert reply["buckets"] == 0
    farm_net.tell(["n2"])  # n1 now announces WAIT: its peers drop it from the members
    result = farm_net.spread(100)
    report("100 connections", result)
    assert result == {"answers": {"n2": 100}, "failures": 0}
    assert farm_net.agents["n1"].cmd(op="status")["state"] == "WAIT"


def test_unicast_mode_and_clean_stop(farm_net: FarmNet) -> None:
    farm_net.build(["n1", "n2"])
    farm_net.start("n1", EQUAL, mac_mode="unicast")
    farm_net.start("n2", EQUAL, mac_mode="unicast")
    farm_net.tell(["n1", "n2"])
    result = farm_net.spread(200)
    report("200 connections", result)
    assert result["failures"] == 0, result
    assert 0.35 <= share(result, "n1") <= 0.65, result
    neigh = sh("ip", "-n", farm_net.client, "neigh", "show", VIP).stdout
    assert "02:bf:0a:63:00:c8" in neigh, neigh

    # Stop removes everything it installed.
    ns = farm_net.ns("n1")
    assert farm_net.agents["n1"].cmd(op="stop") == {"ok": True}
    assert sh("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout.strip() == ""
    assert VIP not in sh("ip", "-n", ns, "addr", "show", "lan0").stdout
    fdb = sh("ip", "netns", "exec", ns, "bridge", "fdb", "show", "dev", "lan0").stdout
    assert "02:bf:0a:63:00:c8" not in fdb


def test_crash_resets_the_dead_nodes_connections_at_once(farm_net: FarmNet) -> None:
    farm_net.build(["n1", "n2"])
    farm_net.start("n1", EQUAL)
    farm_net.start("n2", EQUAL)
    farm_net.tell(["n1", "n2"])
    held = farm_net.hold(40)
    try:
        assert held.stdout is not None and held.stdin is not None
        first = json.loads(held.stdout.readline())["answers"]
        assert set(first) == {"n1", "n2"}, first

        farm_net.crash("n2")
        farm_net.tell(["n1"])
        started = time.monotonic()
        held.stdin.write("again\n")
        held.stdin.flush()
        after = json.loads(held.stdout.readline())["answers"]
        elapsed = time.monotonic() - started
    finally:
        held.kill()
        held.wait()
    print(f"farm figure: dead node's connections reset in {elapsed:.2f} s")
    for before, now in zip(first, after, strict=True):
        if before == "n1":
            assert now == "n1"
        else:  # the survivor's stack resets them: no 3 s client timeout each
            assert "ConnectionResetError" in now or "BrokenPipeError" in now, now
    assert elapsed < 2.0
