"""The client stream format (ha_lab.stream): what every lab client writes and every reader
reads. Bad lines are counted and dropped, never a crash, and the good lines around them
are all kept, in order; checked with the real converters of the three clients."""

from __future__ import annotations

import io
import sys
import textwrap

import pytest

from ha_lab.farm_client import HeldConnections, HeldRequest
from ha_lab.observe import Probe, Sample
from ha_lab.records import Ack, Writer
from ha_lab.stream import ClientStream, emit, parse

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
