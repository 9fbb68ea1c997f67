"""A farm's clients, from the lab's client namespace: who answers, and does anyone fail.

Farm modules (docs/farm.md) share connections out by hashing the client's address and
port, so a client that wants to see the sharing must open many connections from varied
source ports; one that wants to check that a node's return does not break the survivor's
connections must hold connections open. This module is both sides:

- run in the client namespace (`python -m ha_lab.farm_client ...`, started through
  `Lab.client_argv`): `spread` opens N connections, one request each, and prints who
  answered; `hold` keeps N keep-alive connections and sends a request on each in turn,
  one line per request in the client stream format (ha_lab.stream);
- on the controller: `spread()` and `HeldConnections` start those and read their output.
  Timestamps are CLOCK_MONOTONIC, shared by the host and every namespace, so they compare
  with the moment the controller crashed or booted a node.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .lab import Lab
from .observe import Sample
from .probe import ask, attempt
from .stream import ClientStream, emit, optional_int, optional_str, time_of


def run_spread(a: argparse.Namespace) -> None:
    with ThreadPoolExecutor(max_workers=a.workers) as pool:
        answers = list(
            pool.map(lambda _i: attempt(a.host, a.port, a.path, a.timeout), range(a.count))
        )
    served = Counter(x for x in answers if x is not None)
    print(json.dumps({"count": a.count, "failures": answers.count(None), "served": dict(served)}))


def run_hold(a: argparse.Namespace) -> None:
    """Keep-alive connections, opened once; a failed request is reported and not retried on a
    new connection (the point is whether the *existing* connection survives)."""
    conns = [
        http.client.HTTPConnection(a.host, a.port, timeout=a.timeout) for _ in range(a.connections)
    ]
    broken = [False] * a.connections
    end = time.monotonic() + a.duration
    while time.monotonic() < end:
        started = time.monotonic()
        for i, conn in enumerate(conns):
            t = time.monotonic()
            node = None
            if not broken[i]:
                try:
                    node = ask(conn, a.path)
                except (OSError, ValueError, http.client.HTTPException):
                    node = None
                broken[i] = node is None
            sport = conn.sock.getsockname()[1] if conn.sock is not None else None
            emit(sys.stdout, t=t, conn=i, sport=sport, node=node)
        time.sleep(max(0.0, a.interval - (time.monotonic() - started)))


_LINGER_RESET = struct.pack("ii", 1, 0)


def _load_request(a: argparse.Namespace) -> bool:
    """One request on a new connection, closed with a reset (SO_LINGER 0): a load generator
    opening thousands of connections per second to one address would otherwise fill the
    client's ephemeral ports with TIME_WAIT sockets within a minute and measure that."""
    conn = http.client.HTTPConnection(a.host, a.port, timeout=a.timeout)
    try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        return ask(conn, a.path) is not None
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _load_worker(a: argparse.Namespace, stop_at: float, out: list[int]) -> None:
    ok = failed = 0
    while time.monotonic() < stop_at:
        if _load_request(a):
            ok += 1
        else:
            failed += 1
    out += [ok, failed]


def run_load(a: argparse.Namespace) -> None:
    """`threads` clients, each a new connection per request, for `duration` seconds."""
    stop_at = time.monotonic() + a.duration
    results: list[list[int]] = [[] for _ in range(a.threads)]
    threads = [
        threading.Thread(target=_load_worker, args=(a, stop_at, results[i]))
        for i in range(a.threads)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - started
    ok = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    print(json.dumps({"requests": ok, "failures": failed, "seconds": seconds, "rps": ok / seconds}))


# ------------------------------------------------------------------------- controller side


def recovery(samples: list[Sample], after: float, end: float) -> tuple[float | None, set[str]]:
    """First time after `after` from which every sample up to `end` succeeded, and who
    answered from then on (None when the last sample failed)."""
    window = [s for s in samples if after <= s.t <= end]
    recovered = None
    for s in window:
        if s.node is None:
            recovered = None
        elif recovered is None:
            recovered = s.t
    nodes = {s.node for s in window if recovered is not None and s.t >= recovered}
    return recovered, {n for n in nodes if n}


def load(host: str, port: int = 8080, *, threads: int = 8, duration: float = 5.0) -> dict[str, Any]:
    """Requests per second a client reaches (new connection per request, `threads` at once)."""
    argv = Lab.client_argv(
        [sys.executable, "-m", "ha_lab.farm_client", "load", host, "--port", str(port),
         "--threads", str(threads), "--duration", str(duration), "--timeout", "2"]
    )  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def spread(
    host: str,
    port: int = 8080,
    *,
    path: str = "/",
    count: int = 200,
    timeout: float = 3.0,
    workers: int = 8,
) -> dict[str, Any]:
    """`count` requests through the VIP, each on a new connection: {"served": {node: n}, ...}."""
    argv = Lab.client_argv(
        [sys.executable, "-m", "ha_lab.farm_client", "spread", host, "--port", str(port),
         "--path", path, "--count", str(count), "--timeout", str(timeout),
         "--workers", str(workers)]
    )  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@dataclass
class HeldRequest:
    t: float
    conn: int
    sport: int | None
    node: str | None


def _held(data: dict[str, Any]) -> HeldRequest:
    conn = optional_int(data["conn"])
    if conn is None:
        raise TypeError("a held request without conn")
    return HeldRequest(time_of(data), conn, optional_int(data["sport"]), optional_str(data["node"]))


@dataclass
class HeldConnections:
    """N keep-alive connections held from the client namespace, each asked every interval."""

    host: str
    port: int = 8080
    path: str = "/"
    connections: int = 20
    interval: float = 0.1
    timeout: float = 2.0
    duration: float = 600.0

    def __post_init__(self) -> None:
        argv = [
            sys.executable, "-m", "ha_lab.farm_client", "hold", self.host,
            "--port", str(self.port), "--path", self.path,
            "--connections", str(self.connections), "--interval", str(self.interval),
            "--timeout", str(self.timeout), "--duration", str(self.duration)
        ]  # fmt: skip
        self.stream: ClientStream[HeldRequest] = ClientStream(Lab.client_argv(argv), _held)

    def start(self) -> HeldConnections:
        self.stream.start()
        return self

    def snapshot(self) -> list[HeldRequest]:
        return [r for r in self.stream.records() if r is not None]

    def wait_rounds(self, rounds: int, timeout: float = 30.0) -> bool:
        return self.stream.wait(
            lambda reqs: len(reqs) >= rounds * self.connections, timeout, poll=0.05
        )

    def stop(self) -> list[HeldRequest]:
        self.stream.stop()
        return self.snapshot()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("spread", "hold", "load"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("--port", type=int, default=8080)
        p.add_argument("--path", default="/")
        p.add_argument("--timeout", type=float, default=3.0)
        if name == "spread":
            p.add_argument("--count", type=int, default=200)
            p.add_argument("--workers", type=int, default=8)
        elif name == "load":
            p.add_argument("--threads", type=int, default=8)
            p.add_argument("--duration", type=float, default=5.0)
        else:
            p.add_argument("--connections", type=int, default=20)
            p.add_argument("--interval", type=float, default=0.1)
            p.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.cmd == "spread":
        run_spread(args)
    elif args.cmd == "load":
        run_load(args)
    else:
        run_hold(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
