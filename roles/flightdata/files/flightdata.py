#!/usr/bin/python3
"""flightdata: the demo site's application, a tiny record store over HTTP.

It is the application a hapair mirror module protects: it runs on the primary only,
keeps its records in SQLite under one directory (the directory the replicator
protects) and acknowledges a write only once the transaction is durable.

    POST /records        JSON body      -> 201 {"id": N}   (after COMMIT, synchronous=FULL)
    GET  /records/N                     -> 200 {"id": N, "record": <body>} or 404
    GET  /health                        -> 200 {"node": "<hostname>"}

Standard library only (http.server, sqlite3): nodes are air-gapped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOG = logging.getLogger("flightdata")

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    body    TEXT    NOT NULL
)
"""


class Store:
    """One SQLite connection shared by the request threads, serialised by a lock.

    journal_mode=WAL with locking_mode=EXCLUSIVE: a COMMIT appends its pages to the
    write-ahead log and fsyncs that one file (synchronous=FULL) before it returns. The
    rollback journal (DELETE) created, wrote, fsynced and unlinked a journal and fsynced the
    database on every COMMIT: four times the operations, each a round through the
    replicator, for one commit (0.12 of the local disk's commits/s replicated, against
    0.4 of it with WAL; docs/benchmarks.md). EXCLUSIVE because this process holds the
    only connection: SQLite then keeps the WAL index in its own memory and never maps a
    shared-memory file (-shm), the part of WAL SQLite documents as unsafe on network file
    systems. A copy taken over by the secondary is a database plus its WAL, which SQLite
    replays on open: every commit acknowledged to a client was fsynced in that WAL, so
    it is on both nodes.
    """

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # Before journal_mode: in EXCLUSIVE mode, WAL never creates the -shm file.
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)

    def add(self, body: str) -> int:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute("INSERT INTO records (body) VALUES (?)", (body,))
                rowid = cur.lastrowid
                cur.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        assert rowid is not None
        return int(rowid)

    def get(self, rowid: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM records WHERE id = ?", (rowid,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Handler(BaseHTTPRequestHandler):
    server_version = "flightdata/1.0"
    protocol_version = "HTTP/1.1"
    store: Store
    node: str
    max_body: int

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
        prefix = "/records/"
        if self.path.startswith(prefix) and self.path[len(prefix) :].isdigit():
            rowid = int(self.path[len(prefix) :])
            try:
                body = self.store.get(rowid)
            except sqlite3.Error:
                # An answer, not a dropped connection: the client must tell "not readable
                # now" from "not there", and the journal must say why.
                LOG.exception("read of record %d failed", rowid)
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "read failed"})
                return
            if body is None:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no record {rowid}"})
            else:
                self._reply(HTTPStatus.OK, {"id": rowid, "record": json.loads(body)})
            return
        self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/records":
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return
        if length < 0 or length > self.max_body:
            self.close_connection = True
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
            return
        raw = self.rfile.read(length)
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {exc}"})
            return
        try:
            rowid = self.store.add(json.dumps(record, separators=(",", ":")))
        except sqlite3.Error:
            LOG.exception("write failed")
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "write failed"})
            return
        self._reply(HTTPStatus.CREATED, {"id": rowid})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default=os.environ.get("FLIGHTDATA_LISTEN", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("FLIGHTDATA_PORT", "8080")))
    parser.add_argument(
        "--database",
        default=os.environ.get("FLIGHTDATA_DATABASE", "/var/lib/flightdata/flightdata.db"),
    )
    parser.add_argument("--max-body", type=int, default=1024 * 1024)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)

    # Two lines with the journal's own "Started" apart: where a slow start went (the
    # interpreter and its imports, or opening the database through the replicated mount).
    LOG.info("opening %s", args.database)
    opening = time.monotonic()
    store = Store(args.database)
    opened_s = time.monotonic() - opening
    Handler.store = store
    Handler.node = socket.gethostname()
    Handler.max_body = args.max_body
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((args.listen, args.port), Handler)

    def stop(signum: int, _frame: object) -> None:
        LOG.info("signal %d: stopping", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    LOG.info(
        "serving %s on %s:%d as %s (database opened in %.3f s)",
        args.database, args.listen, args.port, Handler.node, opened_s,
    )  # fmt: skip
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
