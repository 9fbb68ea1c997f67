"""The client for the namespace tests, run inside the client namespace.

`python client.py spread HOST PORT N`: N sequential connections (each from a new source
port), one line each; prints {"answers": {node: count}, "failures": n}.
`python client.py hold HOST PORT K`: opens K connections, prints the first answers, then
for every line on stdin sends one line on every connection and prints the answers (an
error counts as a failure, never a crash).
"""

from __future__ import annotations

import json
import socket
import sys
from collections import Counter

TIMEOUT = 3.0


def ask(sock: socket.socket) -> str:
    sock.sendall(b"hello\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data.decode().strip()


def spread(host: str, port: int, n: int) -> None:
    answers: Counter[str] = Counter()
    failures = 0
    for _ in range(n):
        try:
            with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
                sock.settimeout(TIMEOUT)
                answers[ask(sock)] += 1
        except OSError:
            failures += 1
    print(json.dumps({"answers": dict(answers), "failures": failures}), flush=True)


def hold(host: str, port: int, k: int) -> None:
    socks = []
    for _ in range(k):
        s = socket.create_connection((host, port), timeout=TIMEOUT)
        s.settimeout(TIMEOUT)
        socks.append(s)

    def round_() -> dict[str, object]:
        answers: list[str] = []
        for s in socks:
            try:
                answers.append(ask(s))
            except OSError as exc:
                answers.append(f"error: {exc!r}")
        return {"answers": answers, "ports": [s.getsockname()[1] for s in socks]}

    print(json.dumps(round_()), flush=True)
    for _ in sys.stdin:
        print(json.dumps(round_()), flush=True)


if __name__ == "__main__":
    mode, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    (spread if mode == "spread" else hold)(host, port, count)
