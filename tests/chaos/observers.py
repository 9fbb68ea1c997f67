"""What the campaign samples while the nemesis works: VIP holders, farm buckets, states.

- `HolderObserver` (every ~200 ms, one thread): on every running node at once, the lan0
  IPv4 addresses (`ip -br -4 addr`) and the farm's bucket set in the kernel (the `mine`
  set of the weather module's nftables table, the set that decides which new connections
  this node accepts). One round = both nodes asked concurrently.
- `StateObserver` (every ~500 ms): `hactl status --json` on every running node.
- `ConsoleObserver` (every ~1 s): from the controller, like an operator's browser and a
  Prometheus server, each node's web console (HTTPS, site CA, read-only login) and its
  /metrics; every poll kept, failed or not, judged afterwards (`console_verdict`).

Timestamps are CLOCK_MONOTONIC, as the nemesis' fault log and the workloads'.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from ha_lab.lab import Lab
from ha_lab.node import Node

NODES = ("node1", "node2")
MIRROR_VIP = "10.77.0.100"
FARM_TABLE = "hapair-farm-weather"
# inventories/lab/group_vars/all/runtime.yml: console and exporter on the management address.
CONSOLE_ADDRESS = {"node1": "10.79.0.11:8443", "node2": "10.79.0.12:8443"}
METRICS_ADDRESS = {"node1": "10.79.0.11:9440", "node2": "10.79.0.12:9440"}
# The site CA the runtime role generated on this controller (hapair_runtime_secrets_dir).
SITE_CA = Path.home() / ".local/share/hapair/sites/lab/ca.crt"
VIEWER = ("viewer", "hapair-lab-viewer")  # the lab's read-only console user (runtime.yml)
CONSOLE_COOKIE = "hapair_console"
POLL_TIMEOUT_S = 5.0

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


# ---------------------------------------------------------------------------- console


@dataclass
class Poll:
    node: str
    what: str  # "console" or "metrics"
    t0: float
    t1: float
    error: str | None  # None: answered as expected


class ConsoleObserver(_Sampler):
    """The console's pair page (GET /, logged in as the read-only user: the page an
    operator watches, which also asks the peer's console) and /metrics of every node,
    whether it runs or not: the verdict decides which failures the faults excuse."""

    interval = 1.0

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        # One loop per node and page: a node that does not answer (timeout) must not slow
        # down the polls of the other.
        self._jobs = [(n, w) for n in NODES for w in ("console", "metrics")]
        self._threads = [
            threading.Thread(target=self._job_loop, args=(job,), daemon=True) for job in self._jobs
        ]
        self.polls: list[Poll] = []
        self._lock = threading.Lock()
        self._cookies: dict[str, str] = {}
        self._tls = ssl.create_default_context(cafile=str(SITE_CA))
        # The node certificates name the node and its hb/lan addresses, not the management
        # address: the chain is checked here, the name after the handshake (as the nodes'
        # consoles check each other, console/server.py client_context).
        self._tls.check_hostname = False

    def _https(
        self, node: str, method: str, path: str, body: str | None = None
    ) -> http.client.HTTPResponse:
        host, _, port = CONSOLE_ADDRESS[node].rpartition(":")
        conn = http.client.HTTPSConnection(host, int(port), context=self._tls,
                                           timeout=POLL_TIMEOUT_S)  # fmt: skip
        headers = {"Connection": "close"}
        if node in self._cookies:
            headers["Cookie"] = f"{CONSOLE_COOKIE}={self._cookies[node]}"
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.connect()
        sock = conn.sock
        cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
        subject = cert.get("subject", ()) if cert else ()
        cn = next((str(a[1]) for rdn in subject for a in rdn if a[0] == "commonName"), None)
        if cn != node:
            conn.close()
            raise ssl.SSLError(f"certificate of {cn!r}, not {node}")
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()  # the whole page, as a browser would
        conn.close()
        for value in resp.headers.get_all("Set-Cookie") or []:
            name, _, rest = value.partition("=")
            if name.strip() == CONSOLE_COOKIE:
                self._cookies[node] = rest.split(";", 1)[0]
        return resp

    def _console(self, node: str) -> str | None:
        resp = self._https(node, "GET", "/")
        if resp.status == 303 and resp.headers.get("Location") == "/login":
            # No session (first poll, or the runtime restarted): log in again.
            self._cookies.pop(node, None)
            form = urllib.parse.urlencode({"user": VIEWER[0], "password": VIEWER[1]})
            login = self._https(node, "POST", "/login", form)
            if login.status != 303:
                return f"login answered {login.status}"
            resp = self._https(node, "GET", "/")
        return None if resp.status == 200 else f"GET / answered {resp.status}"

    def _metrics(self, node: str) -> str | None:
        host, _, port = METRICS_ADDRESS[node].rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=POLL_TIMEOUT_S)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            text = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            return f"GET /metrics answered {resp.status}"
        return None if b"hapair_build_info" in text else "no hapair_build_info in /metrics"

    def _poll(self, job: tuple[str, str]) -> Poll:
        node, what = job
        t0 = time.monotonic()
        try:
            error = self._console(node) if what == "console" else self._metrics(node)
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        return Poll(node, what, t0, time.monotonic(), error)

    def start(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self._pool.shutdown(wait=False)

    def _job_loop(self, job: tuple[str, str]) -> None:
        while not self._stop.is_set():
            poll = self._poll(job)
            with self._lock:
                self.polls.append(poll)
            self._stop.wait(max(0.0, self.interval - (poll.t1 - poll.t0)))

    def sample(self) -> None:  # the per-job loops poll
        raise NotImplementedError

    def snapshot(self) -> list[Poll]:
        with self._lock:
            return list(self.polls)
