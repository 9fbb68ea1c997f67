"""Count what really crosses the lab's switch on a TCP port (nftables counters).

The replication link is a TLS connection between two nodes; the runtime's own progress
counters say what it *meant* to send. `WireCounter` counts what the lab's bridges forwarded
on the replication port, on every network (lan and hb: the link falls back from one to the
other), with a counter per direction, in the lab's own network namespace where no node can
touch it. Bytes are IP packets (IP + TCP headers + TLS records), as a capture would see them.

    with WireCounter(7441) as wire:
        ...
    wire.to_port, wire.from_port   # bytes towards the listener (primary -> secondary) and back
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import TracebackType

from .system import run
from .topology import NET_NS

TABLE = "hapair_wire_count"


@dataclass
class WireCounter:
    port: int
    to_port: int = 0  # bytes of packets whose destination port is `port`
    from_port: int = 0  # bytes of packets whose source port is `port`
    packets: int = 0

    def __enter__(self) -> WireCounter:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _nft(self, script: str) -> None:
        run(["ip", "netns", "exec", NET_NS, "nft", "-f", "-"], input_text=script)

    def start(self) -> None:
        """(Re)create the counters at zero."""
        self._nft(
            f"table bridge {TABLE}\ndelete table bridge {TABLE}\n"
            f"table bridge {TABLE} {{\n"
            "  chain counting {\n"
            "    type filter hook forward priority -300; policy accept;\n"
            f"    tcp dport {self.port} counter\n"
            f"    tcp sport {self.port} counter\n"
            "  }\n}\n"
        )

    def read(self) -> WireCounter:
        out = run(["ip", "netns", "exec", NET_NS, "nft", "-j", "list", "table", "bridge", TABLE])
        self.to_port = self.from_port = self.packets = 0
        for item in json.loads(out.stdout).get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            match = next((e["match"] for e in rule["expr"] if "match" in e), None)
            counter = next((e["counter"] for e in rule["expr"] if "counter" in e), None)
            if match is None or counter is None:
                continue
            field = match["left"]["payload"]["field"]
            if field == "dport":
                self.to_port += int(counter["bytes"])
            else:
                self.from_port += int(counter["bytes"])
            self.packets += int(counter["packets"])
        return self

    def stop(self) -> None:
        self.read()
        self._nft(f"table bridge {TABLE}\ndelete table bridge {TABLE}\n")
