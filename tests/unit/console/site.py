"""A two-node site on loopback (node1 127.0.0.1, node2 127.0.0.2) with real TLS files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from .pki import make_ca, make_cert


class FakeVip:
    """The VIP is the one part faked (no root, no interface): who holds it is recorded."""

    def __init__(self, node: str, holders: dict[str, str]) -> None:
        self.node, self.holders = node, holders

    async def add(self, m: Any) -> None:
        other = self.holders.get(m.name)
        assert other in (None, self.node), f"VIP of {m.name} already held by {other}"
        self.holders[m.name] = self.node

    async def remove(self, m: Any) -> None:
        if self.holders.get(m.name) == self.node:
            del self.holders[m.name]

    def held(self, m: Any) -> bool | None:
        return self.holders.get(m.name) == self.node


def pair_site(tmp: Path, node: str, port: int, *, replicated: int = 0, console: str = "") -> Path:
    """cluster.yml of `node` (and its module file); `console` is the YAML of the optional
    console section, indented as a top-level key; `replicated`: the replication port of a
    replicated directory (0: none)."""
    pki = tmp / "pki"
    if not (pki / "ca.crt").exists():
        ca = make_ca(pki)
        for n in ("node1", "node2"):
            make_cert(pki, ca, n)
    base = tmp / node
    (base / "modules").mkdir(parents=True, exist_ok=True)
    key = base / "site.key"
    key.write_bytes(b"m" * 48)
    key.chmod(0o600)
    for name in ("start_prim", "stop_prim"):
        script = base / name
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755)
    (base / "cluster.yml").write_text(
        f"""
node: {node}
nodes:
  - {{name: node1, addresses: {{lan: 127.0.0.1}}}}
  - {{name: node2, addresses: {{lan: 127.0.0.2}}}}
heartbeat_port: {port}
site_key: {key}
tls: {{ca: {pki}/ca.crt, cert: {pki}/{node}.crt, key: {pki}/{node}.key}}
api_socket: {base}/api.sock
metrics_address: ""
state_dir: {base}/state
modules_dir: {base}/modules
{console}
"""
    )
    extra = ""
    if replicated:
        extra = (
            f"replicated_dirs: [{base}/app]\n"
            f"replication: {{port: {replicated}, timeout_ms: 1000, networks: [lan]}}\n"
        )
    (base / "modules" / "flightdata.yml").write_text(
        f"""
name: flightdata
type: mirror
nodes: [node1, node2]
default_primary: node1
vip: {{address: 10.77.0.100/24, interface: lan0}}
heartbeat: {{interval_ms: 100, timeout_ms: 1000}}
scripts: {{start_prim: {base}/start_prim, stop_prim: {base}/stop_prim, timeout_s: 5}}
checkers:
  - {{name: alive, type: command, command: /bin/true, interval_s: 0.2, action: wait}}
{extra}"""
    )
    return base / "cluster.yml"


async def wait(pred: Any, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)
