"""The client side of the control API (api.py): what hactl sends and reads.

Apart from the server so that hactl's client commands do not import trio: every `hactl`
run is a fresh interpreter, and playbooks run it on the node that is taking over; trio was
a third of its start (0.14 of 0.45 s of CPU on a lab node).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


def call(path: Path, request: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Blocking client used by hactl: returns the decoded response object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall((json.dumps(request) + "\n").encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    data = json.loads(buf or b"null")
    if not isinstance(data, dict):
        raise TypeError("the daemon answered something that is not a JSON object")
    return data
