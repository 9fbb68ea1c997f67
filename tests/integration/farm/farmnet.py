"""Helpers of the farm tests on real network namespaces: a bridge, 2-3 node namespaces, a client.

Namespaces are named `hafarm-test-<pid>-<tag>-*`, created and deleted here (even when a test
fails); the shared lab's `halab-*` namespaces are never touched.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
SUBNET = "10.99.0"
VIP = f"{SUBNET}.200"
CLIENT = f"{SUBNET}.50"
PORT = 8080


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


class Agent:
    """One node's agent process (FarmService + TCP server) inside its namespace."""

    def __init__(self, ns: str, config: dict[str, Any]) -> None:
        self.ns = ns
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(HERE / "agent.py"), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.readline(15.0) == '"ready"'

    def readline(self, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"agent in {self.ns} did not answer in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"agent in {self.ns} exited: {err[-3000:]}")
        return line.strip()

    def cmd(self, **obj: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.readline())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class FarmNet:
    def __init__(self, tag: str) -> None:
        self.prefix = f"hafarm-test-{os.getpid()}-{tag}"
        self.net = f"{self.prefix}-net"
        self.client = f"{self.prefix}-cl"
        self.namespaces: list[str] = []
        self.agents: dict[str, Agent] = {}
        self.index: dict[str, int] = {}

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _plug(self, ns: str, port: str, address: str) -> None:
        sh(
            "ip",
            "-n",
            self.net,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "lan0",
            "netns",
            ns,
        )
        sh("ip", "-n", self.net, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "lan0")
        sh("ip", "-n", ns, "link", "set", "lan0", "up")

    def build(self, nodes: list[str]) -> None:
        self._add_ns(self.net)
        # Plain flooding switch: no IGMP snooping (docs/farm.md, network requirements).
        sh("ip", "-n", self.net, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        sh("ip", "-n", self.net, "link", "set", "br0", "up")
        self._add_ns(self.client)
        self._plug(self.client, "p-cl", CLIENT)
        for i, node in enumerate(nodes, start=1):
            self.index[node] = i
            self.boot(node)

    def boot(self, node: str) -> None:
        """A node's machine (namespace + link), as it is after a reboot: nothing installed."""
        self._add_ns(self.ns(node))
        self._plug(self.ns(node), f"p-{node}", f"{SUBNET}.{10 + self.index[node]}")

    def start(self, node: str, powers: list[tuple[str, int]], **extra: Any) -> Agent:
        config = {
            "module": "weather",
            "node": node,
            "name": node,
            "nodes": powers,
            "vip": VIP,
            "interface": "lan0",
            "port": PORT,
            "rules": [{"protocol": "tcp", "ports": [[PORT, PORT]], "hash": "address_port"}],
            **extra,
        }
        agent = Agent(self.ns(node), config)
        self.agents[node] = agent
        return agent

    def crash(self, node: str) -> None:
        """Pull the plug: the machine leaves the network, then its process dies.

        The link goes first, as in a power cut: a process killed while its machine is still
        on the network has its kernel close every socket with a FIN, which the client
        receives, and the client then sees that FIN (EOF) or the survivor's reset depending
        on scheduling (the flake of test_crash_resets_the_dead_nodes_connections_at_once
        under CPU load). A dead machine sends nothing."""
        sh("ip", "-n", self.net, "link", "del", f"p-{node}")  # takes the node's lan0 with it
        self.agents.pop(node).kill()
        name = self.ns(node)
        sh("ip", "netns", "del", name, check=False)
        self.namespaces.remove(name)

    def tell(self, alive: list[str]) -> None:
        """Heartbeat layer stand-in: every running agent learns who is alive and UP."""
        for node, agent in self.agents.items():
            peers = [{"name": p, "alive": True, "eligible": True} for p in alive if p != node]
            reply = agent.cmd(op="membership", peers=peers)
            assert reply["ok"]

    def client_run(self, *args: str, timeout: float = 60.0) -> Any:
        out = subprocess.run(
            ["ip", "netns", "exec", self.client, sys.executable, str(HERE / "client.py"), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return json.loads(out.stdout)

    def spread(self, n: int) -> dict[str, Any]:
        result: dict[str, Any] = self.client_run("spread", VIP, str(PORT), str(n))
        return result

    def hold(self, k: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.client,
                sys.executable,
                str(HERE / "client.py"),
                "hold",
                VIP,
                str(PORT),
                str(k),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def teardown(self) -> None:
        for agent in self.agents.values():
            agent.kill()
        self.agents.clear()
        for name in reversed(self.namespaces):
            sh("ip", "netns", "del", name, check=False)
        self.namespaces.clear()
