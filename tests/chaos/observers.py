"""What the campaign samples while the nemesis works: VIP holders, farm buckets, states.

- `HolderObserver` (every ~200 ms, one thread): on every running node at once, the lan0
  IPv4 addresses (`ip -br -4 addr`) and the farm's bucket set in the kernel (the `mine`
  set of the weather module's nftables table, the set that decides which new connections
  this node accepts). One round = both nodes asked concurrently.
- `StateObserver` (every ~500 ms): `hactl status --json` on every running node.

Timestamps are CLOCK_MONOTONIC, as the nemesis' fault log and the workloads'.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self

from ha_lab.lab import Lab
from ha_lab.node import Node

NODES = ("node1", "node2")
MIRROR_VIP = "10.77.0.100"
FARM_TABLE = "hapair-farm-weather"

_PROBE = (
    "ip -br -4 addr show dev lan0; echo '--nft--'; "
    f"nft -j list set ip {FARM_TABLE} mine 2>/dev/null || true"
)


@dataclass
class NodeView:
    vip: bool
    buckets: frozenset[int]


@dataclass
class HolderRound:
    t0: float  # round started
    t1: float  # last answer in
    views: dict[str, NodeView]

    @property
    def vip_holders(self) -> list[str]:
        return sorted(n for n, v in self.views.items() if v.vip)


def _buckets(text: str) -> frozenset[int]:
    try:
        data = json.loads(text)
    except ValueError:
        return frozenset()
    out: set[int] = set()
    for item in data.get("nftables", []):
        for elem in (item.get("set") or {}).get("elem", []) or []:
            if isinstance(elem, int):
                out.add(elem)
            elif isinstance(elem, dict) and "range" in elem:
                lo, hi = elem["range"]
                out.update(range(int(lo), int(hi) + 1))
            elif isinstance(elem, dict) and isinstance(elem.get("elem"), dict):
                val = elem["elem"].get("val")
                if isinstance(val, int):
                    out.add(val)
    return frozenset(out)


def _running(node: str) -> bool:
    try:
        return Node(node).init_pid() is not None
    except Exception:
        return False


class _Sampler:
    interval = 0.2

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._pool = ThreadPoolExecutor(max_workers=len(NODES))
        self.errors = 0

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=False)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sample()
            except Exception:
                self.errors += 1
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def sample(self) -> None:
        raise NotImplementedError

    def _exec(self, node: str, argv: list[str], timeout: float) -> str | None:
        if not _running(node):
            return None
        try:
            proc = subprocess.run(
                self.lab.exec_argv(node, argv),
                capture_output=True, text=True, timeout=timeout, check=False,
            )  # fmt: skip
        except Exception:
            return None
        return proc.stdout if proc.returncode == 0 else None


class HolderObserver(_Sampler):
    interval = 0.2

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.rounds: list[HolderRound] = []
        self._lock = threading.Lock()

    def _view(self, node: str) -> NodeView | None:
        out = self._exec(node, ["sh", "-c", _PROBE], timeout=5)
        if out is None:
            return None
        addr, _, nft = out.partition("--nft--")
        vip = any(tok.split("/")[0] == MIRROR_VIP for tok in addr.split())
        return NodeView(vip, _buckets(nft.strip()))

    def sample(self) -> None:
        t0 = time.monotonic()
        views = dict(zip(NODES, self._pool.map(self._view, NODES), strict=True))
        t1 = time.monotonic()
        kept = {n: v for n, v in views.items() if v is not None}
        with self._lock:
            self.rounds.append(HolderRound(t0, t1, kept))

    def snapshot(self) -> list[HolderRound]:
        with self._lock:
            return list(self.rounds)


@dataclass
class StateRound:
    t: float
    modules: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def state(self, node: str, module: str) -> str | None:
        s = self.modules.get(node, {}).get(module, {}).get("state")
        return str(s) if s else None


class StateObserver(_Sampler):
    interval = 1.0

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.rounds: list[StateRound] = []
        self._lock = threading.Lock()

    def _status(self, node: str) -> dict[str, dict[str, Any]] | None:
        out = self._exec(node, ["hactl", "status", "--json"], timeout=10)
        if out is None:
            return None
        try:
            modules = json.loads(out).get("modules", [])
        except ValueError:
            return None
        keys = ("state", "sync", "reason", "witness_ok", "peer_alive")
        return {str(m.get("module")): {k: m.get(k) for k in keys} for m in modules}

    def sample(self) -> None:
        t = time.monotonic()
        got = dict(zip(NODES, self._pool.map(self._status, NODES), strict=True))
        with self._lock:
            self.rounds.append(StateRound(t, {n: m for n, m in got.items() if m is not None}))

    def snapshot(self) -> list[StateRound]:
        with self._lock:
            return list(self.rounds)
