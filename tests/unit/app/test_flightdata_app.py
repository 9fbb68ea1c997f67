"""The demo application (roles/flightdata/files/flightdata.py) and the record checker the
lab tests and the fault campaign read it back with (ha_lab.records.check), on loopback.

What is checked: a record posted is read back; a database error on a read is an HTTP 503
with a reason, not a dropped connection; the checker tells a record that failed once and
was read on a retry ("transient") from one never readable ("errors") and from one missing.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sqlite3
import sys
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ha_lab import records

APP = Path(__file__).parents[3] / "roles/flightdata/files/flightdata.py"


def _app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flightdata_app", APP)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FlakyStore:
    """The real store, whose next `fail` reads raise as a damaged or busy database does."""

    def __init__(self, inner: Any, fail: int = 0) -> None:
        self.inner, self.fail = inner, fail

    def add(self, body: str) -> int:
        return int(self.inner.add(body))

    def get(self, rowid: int) -> str | None:
        if self.fail > 0:
            self.fail -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return self.inner.get(rowid)  # type: ignore[no-any-return]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[int, FlakyStore]]:
    app = _app()
    store = FlakyStore(app.Store(str(tmp_path / "flightdata.db")))
    handler = type("H", (app.Handler,), {"store": store, "node": "node-test", "max_body": 4096})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], store
    srv.shutdown()
    srv.server_close()


def _check(port: int, expected: dict[int, int], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(
        sys, "stdin", io.StringIO(json.dumps({str(k): v for k, v in expected.items()}))
    )
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(records.time, "sleep", lambda _s: None)
    assert records.check("127.0.0.1", port, 2.0) == 0
    return json.loads(out.getvalue())


def test_posted_records_read_back_and_a_read_error_is_a_503(
    server: tuple[int, FlakyStore],
) -> None:
    port, store = server
    conn = records._connect("127.0.0.1", port, 2.0)
    status, data = records._request(conn, "POST", "/records", b'{"seq": 7}')
    assert status == 201
    assert records._request(conn, "GET", f"/records/{data['id']}") == (
        200,
        {"id": data["id"], "record": {"seq": 7}},
    )
    store.fail = 1
    status, body = records._request(conn, "GET", f"/records/{data['id']}")
    assert (status, body) == (503, {"error": "read failed"})
    # Same connection still usable: the error was an answer, not a dropped connection.
    assert records._request(conn, "GET", "/health") == (200, {"node": "node-test"})


def test_check_reports_transient_failures_apart_from_lost_records(
    server: tuple[int, FlakyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, store = server
    conn = records._connect("127.0.0.1", port, 2.0)
    ids = [
        records._request(conn, "POST", "/records", json.dumps({"seq": s}).encode())[1]["id"]
        for s in (1, 2, 3)
    ]
    store.fail = 2  # the first two reads fail once each, then succeed
    got = _check(port, {ids[0]: 1, ids[1]: 2, ids[2]: 3, 999: 4}, monkeypatch)
    assert got["missing"] == [999] and got["wrong"] == [] and got["errors"] == []
    assert len(got["transient"]) == 2 and all("HTTP 503" in t for t in got["transient"])
    store.fail = 10**6  # never readable again: an error, after the retries
    got = _check(port, {ids[0]: 1}, monkeypatch)
    assert got["transient"] == [] and len(got["errors"]) == 1


def test_the_writers_stream_reads_back_as_acknowledgements(
    server: tuple[int, FlakyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`records write` against the app, its stream read as the controller reads it, the
    acknowledged records checked: the client stream format end to end, on loopback."""
    port, _store = server
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert records.write("127.0.0.1", port, 2.0, pause=0.0, duration=0.3) == 0
    monkeypatch.undo()
    writer = records.Writer("127.0.0.1", port=port)
    writer.stream.feed(out.getvalue().splitlines(keepends=True))
    acks = writer.snapshot()
    assert acks and writer.failures == 0 and writer.stream.bad_lines == 0
    assert [a.seq for a in acks] == list(range(1, len(acks) + 1))
    report = _check(port, {a.id: a.seq for a in acks}, monkeypatch)
    assert report["checked"] == len(acks) and not (report["missing"] or report["wrong"])


def test_a_commit_is_in_the_write_ahead_log_and_no_shared_memory_file_is_made(
    tmp_path: Path,
) -> None:
    """The demo's commits go to a WAL fsynced per COMMIT, and the WAL index stays in the
    process (locking_mode=EXCLUSIVE): no -shm file, the part of WAL a replicated or network
    file system cannot be trusted with. A copy of the database and its WAL, as a secondary
    holds it after a failover, opens with every committed record."""
    db = tmp_path / "flightdata.db"
    store = _app().Store(str(db))
    ids = [store.add(json.dumps({"seq": i})) for i in range(5)]
    assert (tmp_path / "flightdata.db-wal").stat().st_size > 0
    assert not (tmp_path / "flightdata.db-shm").exists()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("flightdata.db", "flightdata.db-wal"):
        (copy / name).write_bytes((tmp_path / name).read_bytes())  # the app still running
    other = sqlite3.connect(copy / "flightdata.db")
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [r[0] for r in other.execute("SELECT id FROM records ORDER BY id")] == ids
    finally:
        other.close()
