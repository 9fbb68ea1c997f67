"""A client that writes records through a VIP and remembers every acknowledged one.

The proof that no acknowledged write is lost: `Writer` runs `python -m ha_lab.records
write` in the lab's client namespace; it POSTs `/records` in a loop (a new body each time,
carrying a sequence number) and emits one line per answer in the client stream format
(ha_lab.stream). A 201 `{"id": N}` is an
acknowledgement: the application committed the record (SQLite, synchronous=FULL) and, on a
replicated directory, the secondary made it durable too. `read_back` later GETs every
acknowledged id through the VIP and checks each record is there *with the body that was
acknowledged* (an id given twice, once before a lost write and once after, would
otherwise pass).

    python -m ha_lab.records write 10.77.0.100 [--port 8080] [--duration 600]
    python -m ha_lab.records check 10.77.0.100 < acks.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .lab import Lab
from .stream import ClientStream, emit, optional_int, time_of


@dataclass(frozen=True)
class Ack:
    t: float  # CLOCK_MONOTONIC when the 201 arrived
    seq: int  # the writer's sequence number, in the body
    id: int  # the id the application gave


def _answer(data: dict[str, Any]) -> Ack | None:
    """A writer's line: an Ack for a 201, None for a request that got none."""
    t, seq, rowid = time_of(data), optional_int(data["seq"]), optional_int(data["id"])
    if seq is None:
        raise TypeError("a writer's line without seq")
    return None if rowid is None else Ack(t, seq, rowid)


@dataclass
class Writer:
    """POST /records through `host` from the client namespace, as fast as answered."""

    host: str
    port: int = 8080
    timeout: float = 2.0
    pause: float = 0.0
    duration: float = 600.0

    def __post_init__(self) -> None:
        argv = [
            sys.executable, "-m", "ha_lab.records", "write", self.host,
            "--port", str(self.port), "--timeout", str(self.timeout),
            "--pause", str(self.pause), "--duration", str(self.duration)
        ]  # fmt: skip
        self.stream: ClientStream[Ack] = ClientStream(Lab.client_argv(argv), _answer)

    def start(self) -> Writer:
        self.stream.start()
        return self

    @property
    def failures(self) -> int:
        """Requests that got no acknowledgement (refused, timed out, connection lost)."""
        return sum(1 for a in self.stream.records() if a is None)

    def snapshot(self) -> list[Ack]:
        return [a for a in self.stream.records() if a is not None]

    def wait_acks(self, count: int, after: float = 0.0, timeout: float = 60.0) -> bool:
        """Wait until `count` acknowledgements arrived after monotonic time `after`."""

        def enough(answers: list[Ack | None]) -> bool:
            return sum(1 for a in answers if a is not None and a.t >= after) >= count

        return self.stream.wait(enough, timeout, poll=0.05)

    def stop(self) -> list[Ack]:
        self.stream.stop()
        return self.snapshot()


@dataclass
class ReadBack:
    checked: int
    missing: list[int]
    wrong: list[dict[str, Any]]
    errors: list[str]  # still not readable after the retries
    served_by: list[str]
    transient: list[str] = field(default_factory=list)  # failed at first, read on a retry

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not (self.missing or self.wrong or self.errors)


def read_back(host: str, acks: list[Ack], port: int = 8080) -> ReadBack:
    """GET every acknowledged record through the VIP (client namespace) and check it."""
    expected = {a.id: a.seq for a in acks}
    argv = [sys.executable, "-m", "ha_lab.records", "check", host, "--port", str(port)]
    proc = subprocess.run(
        Lab.client_argv(argv),
        input=json.dumps({str(k): v for k, v in expected.items()}),
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        return ReadBack(0, [], [], [f"check failed ({proc.returncode}): {proc.stderr[-2000:]}"], [])
    data = json.loads(proc.stdout)
    return ReadBack(
        int(data["checked"]),
        data["missing"],
        data["wrong"],
        data["errors"],
        data["served_by"],
        data.get("transient", []),
    )


# ------------------------------------------------------------------ in the client namespace


def _connect(host: str, port: int, timeout: float) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(host, port, timeout=timeout)


def _request(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, None


def write(host: str, port: int, timeout: float, pause: float, duration: float) -> int:
    end = time.monotonic() + duration
    seq = 0
    conn: http.client.HTTPConnection | None = None
    while time.monotonic() < end:
        seq += 1
        body = json.dumps({"seq": seq, "writer": "ha_lab.records"}).encode()
        line: dict[str, Any] = {"seq": seq, "id": None}
        try:
            if conn is None:
                conn = _connect(host, port, timeout)
            status, data = _request(conn, "POST", "/records", body)
            if status == 201 and isinstance(data, dict) and isinstance(data.get("id"), int):
                line["id"] = data["id"]
            else:
                line["status"] = status
        except (OSError, http.client.HTTPException) as exc:
            line["error"] = type(exc).__name__
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.05)  # the VIP is moving: do not spin
        emit(sys.stdout, t=time.monotonic(), **line)
        if pause:
            time.sleep(pause)
    return 0


# A record that could not be read (connection dropped, HTTP 5xx) is asked again this many
# times, a second apart: "not readable for a moment" is reported apart from "not readable".
RETRIES = 5


def check(host: str, port: int, timeout: float) -> int:
    expected: dict[str, int] = json.load(sys.stdin)
    missing: list[int] = []
    wrong: list[dict[str, Any]] = []
    failed: dict[int, str] = {}
    transient: list[str] = []
    conn = _connect(host, port, timeout)
    _, health = _request(conn, "GET", "/health")
    served_by = [str(health.get("node"))] if isinstance(health, dict) else []

    def get(rowid: int, seq: int) -> None:
        nonlocal conn
        try:
            status, data = _request(conn, "GET", f"/records/{rowid}")
        except (OSError, http.client.HTTPException) as exc:
            failed[rowid] = f"GET /records/{rowid}: {type(exc).__name__}: {exc}"
            conn.close()
            conn = _connect(host, port, timeout)
            return
        if status == 404:
            missing.append(rowid)
        elif status != 200 or not isinstance(data, dict):
            failed[rowid] = f"GET /records/{rowid}: HTTP {status} {data}"
        elif (data.get("record") or {}).get("seq") != seq:
            wrong.append({"id": rowid, "expected_seq": seq, "got": data.get("record")})

    for key, seq in sorted(expected.items(), key=lambda kv: int(kv[0])):
        get(int(key), seq)
    for _ in range(RETRIES):
        if not failed:
            break
        time.sleep(1.0)
        again = dict(failed)
        failed.clear()
        for rowid, first in sorted(again.items()):
            get(rowid, expected[str(rowid)])
            if rowid not in failed:
                transient.append(f"{first} (then read)")
    _, health = _request(conn, "GET", "/health")
    if isinstance(health, dict) and str(health.get("node")) not in served_by:
        served_by.append(str(health.get("node")))
    print(
        json.dumps(
            {"checked": len(expected), "missing": missing, "wrong": wrong,
             "errors": list(failed.values()), "transient": transient, "served_by": served_by}
        )
    )  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("write", "check"))
    parser.add_argument("host")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.mode == "write":
        return write(args.host, args.port, args.timeout, args.pause, args.duration)
    return check(args.host, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
