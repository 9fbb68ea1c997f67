#!/usr/bin/python3
"""weather: the demo site's farm application, a stateless HTTP service on every node.

It is the application a hapair farm module spreads over its nodes: every node runs it,
clients reach it through the farm's virtual IP, and each answer names the node that
served it, so a client (and the tests) can see how the connections are shared out.

    GET /          -> 200 {"node": "<hostname>", "station": ..., "temperature_c": ..., ...}
    GET /health    -> 200 {"node": "<hostname>"}

HTTP/1.1 with keep-alive: a client may send many requests on one connection (the farm
tests hold connections open across a node's return). Standard library only (nodes are
air-gapped). It listens on each --listen address (repeatable): on a node that also runs
a mirror module on the same port, bind the farm's VIP and the node's own addresses rather
than 0.0.0.0 (net.ipv4.ip_nonlocal_bind lets it bind the VIP before hapair adds it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOG = logging.getLogger("weather")


class Handler(BaseHTTPRequestHandler):
    server_version = "weather/1.0"
    protocol_version = "HTTP/1.1"
    node: str = ""
    station: str = ""

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: HTTPStatus, payload: Any) -> None:
        data = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(HTTPStatus.OK, {"node": self.node})
            return
        if self.path in ("/", "/weather"):
            now = time.time()
            # A smooth, deterministic "observation": every node answers the same weather.
            self._reply(
                HTTPStatus.OK,
                {
                    "node": self.node,
                    "station": self.station,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                    "temperature_c": round(12 + 6 * math.sin(now / 3600), 1),
                    "wind_kt": round(10 + 5 * math.cos(now / 1800)),
                    "client": self.client_address[0],
                },
            )
            return
        self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", action="append", help="address to bind (repeatable)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--station", default="LFPG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)

    Handler.node = socket.gethostname()
    Handler.station = args.station
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 256
    servers = [ThreadingHTTPServer((a, args.port), Handler) for a in (args.listen or ["0.0.0.0"])]
    stopped = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        LOG.info("signal %d: stopping", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        for s in servers
    ]
    for t in threads:
        t.start()
    LOG.info("serving on %s port %d as %s", ", ".join(args.listen or ["0.0.0.0"]), args.port,
             Handler.node)  # fmt: skip
    stopped.wait()
    for s in servers:
        s.shutdown()
        s.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
