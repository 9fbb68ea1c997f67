"""HTTP probe run inside the lab's client namespace; one line per attempt (ha_lab.stream).

It runs as its own process in the client namespace (Python 3.11 has no os.setns), and
timestamps with CLOCK_MONOTONIC, which the host and every namespace share, so the
benchmark can compare them with the moment it crashed a node.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time

from .stream import emit


def ask(conn: http.client.HTTPConnection, path: str) -> str | None:
    """GET `path` on `conn`: the node named by a 200 answer, None for any other answer
    (raises on a connection error or a body that is not JSON)."""
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        return None
    node = json.loads(body).get("node")
    return str(node) if node else None


def attempt(host: str, port: int, path: str, timeout: float) -> str | None:
    """A new connection (a new source port), one request: the node that answered, or None
    on any failure."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        return ask(conn, path)
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--path", default="/health")
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=0.25)
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        started = time.monotonic()
        node = attempt(args.host, args.port, args.path, args.timeout)
        emit(sys.stdout, t=started, node=node)
        time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
