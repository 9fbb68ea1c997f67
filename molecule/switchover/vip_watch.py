"""Watch a VIP from outside the nodes until a stop file appears; print one JSON verdict.

Run by side_effect.yml on the controller around the two switchovers. Every ~20 ms it
reads which nodes hold the address on their LAN interface (netlink of each node's
network namespace, `ip -n`), while a client in the lab's client namespace asks the
application through the VIP (ha_lab.observe.Probe). Both views must say the same: the
VIP is never on two nodes at once, and the client's answers move from one node to the
other once per switchover, never back and forth.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

from ha_lab import topology
from ha_lab.lab import existing_nodes
from ha_lab.observe import Probe


def holders(nodes: list[str], address: str, interface: str) -> list[str]:
    found = []
    for node in nodes:
        proc = subprocess.run(
            ["ip", "-n", topology.node_ns(node), "-4", "-o", "addr", "show", "dev", interface],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
        if f" {address}/" in proc.stdout:
            found.append(node)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vip", default="10.77.0.100")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--interface", default="lan0")
    parser.add_argument("--stop-file", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--max", type=float, default=600.0)
    args = parser.parse_args()

    nodes = existing_nodes()
    probe = Probe(args.vip, port=args.port, duration=args.max).start()
    overlaps: list[dict[str, object]] = []
    held_by: list[str] = []  # successive holders, consecutive duplicates collapsed
    reads = 0
    end = time.monotonic() + args.max
    ready = False
    while not args.stop_file.exists() and time.monotonic() < end:
        now = time.monotonic()
        found = holders(nodes, args.vip, args.interface)
        reads += 1
        if len(found) > 1:
            overlaps.append({"t": round(now, 3), "nodes": found})
        label = "+".join(found) or "-"
        if not held_by or held_by[-1] != label:
            held_by.append(label)
        if not ready and probe.snapshot():
            args.ready_file.touch()
            ready = True
        time.sleep(0.02)
    samples = probe.stop()
    answered = [node for node, _ in itertools.groupby(s.node for s in samples if s.node)]
    print(
        json.dumps(
            {
                "vip_reads": reads,
                "vip_holders": [h for h, _ in itertools.groupby(x for x in held_by if x != "-")],
                "vip_holder_changes": held_by,
                "overlaps": overlaps,
                "requests": len(samples),
                "failed_requests": sum(1 for s in samples if s.node is None),
                "answered_by": answered,
            },
            sort_keys=True,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
