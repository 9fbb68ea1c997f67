"""The client stream format (ha_lab.stream): what every lab client writes and every reader
reads. Bad lines are counted and dropped, never a crash, and the good lines around them
are all kept, in order; checked with the real converters of the three clients."""

from __future__ import annotations

import io
import json
import os
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ha_lab import stream
from ha_lab.farm_client import HeldConnections, HeldRequest
from ha_lab.observe import Probe, Sample
from ha_lab.probe import attempt
from ha_lab.records import Ack, Writer
from ha_lab.stream import ClientStream, emit, parse
from tests.sitefactory import free_tcp_port

# Lines a reader may meet besides good ones: a client killed mid-line, a stray print, a
# JSON value that is not an object, a field missing or of the wrong type.
BAD_COMMON = [
    "",
    "\n",
    "not json\n",
    '{"t": 1.0, "node": "node1"',  # cut mid-line
    "[1, 2]\n",
    "null\n",
    '"text"\n',
    "{}\n",
    '{"t": "soon", "node": "node1"}\n',
    '{"t": true, "node": "node1"}\n',
    '{"t": 1.0, "node": 7}\n',
    "\ufffd\ufffd\n",  # what undecodable bytes read as (errors="replace")
]


def lines_of(*records: dict[str, object]) -> list[str]:
    out = io.StringIO()
    for r in records:
        emit(out, **r)
    return out.getvalue().splitlines(keepends=True)


def test_emit_writes_one_flushed_json_object_a_line() -> None:
    assert lines_of({"t": 1.5, "node": None}, {"t": 2, "node": "n"}) == [
        '{"t": 1.5, "node": null}\n',
        '{"t": 2, "node": "n"}\n',
    ]


def test_probe_samples_keep_good_lines_in_order_and_count_bad_ones() -> None:
    probe = Probe("10.77.0.100")
    good = lines_of({"t": 1.0, "node": "node1"}, {"t": 2.0, "node": None})
    probe.stream.feed([good[0], *BAD_COMMON, good[1]])
    assert probe.snapshot() == [Sample(1.0, "node1"), Sample(2.0, None)]
    assert probe.stream.bad_lines == len(BAD_COMMON)


def test_writer_tells_acknowledgements_from_failed_requests_and_bad_lines() -> None:
    writer = Writer("10.77.0.100")
    answers = lines_of(
        {"t": 1.0, "seq": 1, "id": 10},
        {"t": 1.1, "seq": 2, "id": None, "error": "TimeoutError"},
        {"t": 1.2, "seq": 3, "id": None, "status": 503},
    )
    bad = [
        '{"t": 1.3, "seq": 4, "id": "11"}\n',  # an id that is not a number
        '{"t": 1.3, "seq": 4, "id": true}\n',
        '{"t": 1.3, "id": 11}\n',  # no seq
        '{"t": 1.3, "seq": null, "id": 11}\n',
    ]
    writer.stream.feed([*answers, *bad, *BAD_COMMON, *lines_of({"t": 1.4, "seq": 5, "id": 12})])
    assert writer.snapshot() == [Ack(1.0, 1, 10), Ack(1.4, 5, 12)]
    assert writer.failures == 2
    assert writer.stream.bad_lines == len(bad) + len(BAD_COMMON)


def test_held_requests_need_a_connection_number() -> None:
    held = HeldConnections("10.77.0.101")
    good = lines_of(
        {"t": 1.0, "conn": 0, "sport": 40000, "node": "node1"},
        {"t": 1.0, "conn": 1, "sport": None, "node": None},
    )
    bad = [
        '{"t": 1.0, "conn": null, "sport": 1, "node": "node1"}\n',
        '{"t": 1.0, "conn": 2, "sport": "x", "node": "node1"}\n',
        '{"t": 1.0, "sport": 1, "node": "node1"}\n',
    ]
    held.stream.feed([*good, *bad])
    assert held.snapshot() == [HeldRequest(1.0, 0, 40000, "node1"), HeldRequest(1.0, 1, None, None)]
    assert held.stream.bad_lines == len(bad)


@pytest.mark.parametrize("line", BAD_COMMON)
def test_parse_refuses_bad_lines_without_raising(line: str) -> None:
    assert parse(line, Probe("10.77.0.100").stream.convert) == (False, None)


def test_parse_keeps_a_good_line_that_carries_no_record() -> None:
    # A failed request is a good line: counted by the writer, not as a bad line.
    line = lines_of({"t": 1.0, "seq": 1, "id": None})[0]
    assert parse(line, Writer("10.77.0.100").stream.convert) == (True, None)


def test_a_client_process_writing_garbage_and_bad_bytes_is_read_to_its_end() -> None:
    """A real process: good lines, junk, bytes that are not UTF-8, a last line cut short."""
    script = textwrap.dedent(
        """
        import sys
        from ha_lab.stream import emit
        emit(sys.stdout, t=1.0, node="node1")
        sys.stdout.write("Traceback (most recent call last):\\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(b'{"t": 2.0, "node": "\\xff\\xfe"}\\n\\x80\\x81\\n')
        sys.stdout.buffer.flush()
        emit(sys.stdout, t=3.0, node=None)
        sys.stdout.write('{"t": 4.0, "no')
        """
    )
    stream = ClientStream(
        [sys.executable, "-c", script], lambda d: Sample(float(d["t"]), d["node"])
    ).start()
    assert stream.wait(lambda r: len(r) >= 3, timeout=30, poll=0.05)
    records = stream.stop()
    # The non-UTF-8 node name reads as replacement characters: a good line, a lax converter.
    assert [s.t for s in records if s] == [1.0, 2.0, 3.0]
    assert stream.bad_lines == 3  # the traceback line, the lone bad bytes, the cut line


class _Node(BaseHTTPRequestHandler):
    """A web server that says who it is, as the lab's applications do (keep-alive)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({"node": "node-test"}).encode()
        self.send_response(200 if self.path != "/broken" else 500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def node_port() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Node)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _client(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def test_the_probe_and_the_held_connections_read_back_from_real_clients(
    node_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe and `farm_client hold` as processes (on loopback, not in the lab's client
    namespace), their streams read with the readers' own converters: no bad line."""
    # The clients import this tree's ha_lab, whatever the venv has installed.
    src = str(Path(stream.__file__).parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    port = str(node_port)
    probe = ClientStream(
        _client("ha_lab.probe", "127.0.0.1", "--port", port, "--duration", "0.5"),
        Probe("127.0.0.1").stream.convert,
    ).start()
    held = ClientStream(
        _client("ha_lab.farm_client", "hold", "127.0.0.1", "--port", port, "--path", "/",
                "--connections", "2", "--interval", "0.05", "--duration", "0.5"),
        HeldConnections("127.0.0.1").stream.convert,
    ).start()  # fmt: skip
    assert probe.wait(lambda r: len(r) >= 5, timeout=30, poll=0.05)
    assert held.wait(lambda r: len(r) >= 6, timeout=30, poll=0.05)
    samples, requests = probe.stop(), held.stop()
    assert probe.bad_lines == 0 and held.bad_lines == 0
    assert {s.node for s in samples if s} == {"node-test"}
    assert {r.node for r in requests if r} == {"node-test"}
    assert {r.conn for r in requests if r} == {0, 1}
    # every held request kept its connection: one source port per connection
    assert len({(r.conn, r.sport) for r in requests if r}) == 2


def test_attempt_names_the_node_or_none(node_port: int) -> None:
    assert attempt("127.0.0.1", node_port, "/health", 2.0) == "node-test"
    assert attempt("127.0.0.1", node_port, "/broken", 2.0) is None  # HTTP 500
    assert attempt("127.0.0.1", free_tcp_port(), "/health", 2.0) is None  # nobody there
