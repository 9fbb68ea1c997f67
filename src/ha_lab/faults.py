"""Network faults on a node's links, applied on the lab's switch, not inside the node.

The rules live in the bridge namespace (nftables `bridge` family), so the node keeps
its interfaces up, as when a link fails beyond the server, and nothing the node does
can undo them. Each node has its own chain: `restore` is one flush.
"""

from __future__ import annotations

import json

from .system import run
from .topology import NET_NS, NETWORKS, NETWORKS_BY_NAME, Network, node_index, port_ifname

TABLE = "halab_faults"


def _nft(script: str) -> None:
    run(["ip", "netns", "exec", NET_NS, "nft", "-f", "-"], input_text=script)


def _chain(node: str) -> str:
    return f"fault_n{node_index(node)}"


def ensure_table(nodes: list[str]) -> None:
    """The table with one jump per node port; created once, atomically."""
    lines = [
        f"table bridge {TABLE} {{",
        "  chain forward { type filter hook forward priority 0; policy accept; }",
        "}",
        f"flush chain bridge {TABLE} forward",
    ]
    for node in nodes:
        chain = _chain(node)
        lines.append(f"add chain bridge {TABLE} {chain}")
        prefix = f"n{node_index(node)}-*"
        lines.append(f'add rule bridge {TABLE} forward iifname "{prefix}" jump {chain}')
        lines.append(f'add rule bridge {TABLE} forward oifname "{prefix}" jump {chain}')
    _nft("\n".join(lines) + "\n")


def resolve_nets(net: str) -> list[Network]:
    if net == "all":
        return list(NETWORKS)
    if net not in NETWORKS_BY_NAME:
        names = ", ".join([*NETWORKS_BY_NAME, "all"])
        raise ValueError(f"unknown network {net!r}: expected one of {names}")
    return [NETWORKS_BY_NAME[net]]


def cut(node: str, net: str) -> None:
    rules = []
    for network in resolve_nets(net):
        port = port_ifname(node, network)
        for direction in ("iifname", "oifname"):
            rules.append(
                f'add rule bridge {TABLE} {_chain(node)} {direction} "{port}" drop '
                f'comment "cut {network.name}"'
            )
    _nft("\n".join(rules) + "\n")


def loss(node: str, percent: int, net: str) -> None:
    if not 0 <= percent <= 100:
        raise ValueError(f"loss percent must be 0..100, got {percent}")
    if percent == 0:
        return
    rules = []
    for network in resolve_nets(net):
        port = port_ifname(node, network)
        for direction in ("iifname", "oifname"):
            # numgen random mod 100 < P drops P% of frames each way: this kernel has no netem.
            # (nft refuses `< 100` against a 0..99 range, so 100% is a plain drop.)
            match = "" if percent == 100 else f"numgen random mod 100 < {percent} "
            rules.append(
                f'add rule bridge {TABLE} {_chain(node)} {direction} "{port}" '
                f'{match}drop comment "loss {network.name} {percent}%"'
            )
    _nft("\n".join(rules) + "\n")


def restore(node: str) -> None:
    _nft(f"flush chain bridge {TABLE} {_chain(node)}\n")


def active(node: str) -> list[str]:
    """The faults in force on a node's links, by their comments."""
    out = run(
        [
            "ip",
            "netns",
            "exec",
            NET_NS,
            "nft",
            "-j",
            "list",
            "chain",
            "bridge",
            TABLE,
            _chain(node),
        ],
        check=False,
    )
    if out.returncode != 0:
        return []
    found: list[str] = []
    for item in json.loads(out.stdout).get("nftables", []):
        comment = item.get("rule", {}).get("comment")
        if comment and comment not in found:
            found.append(comment)
    return found
