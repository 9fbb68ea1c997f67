#!/usr/bin/python3
"""Probe a module's virtual IP during a switchover and measure the downtime.

Runs on a node of the pair (standard library only: nodes are air-gapped). Sends one
request every --interval seconds to --url (http://VIP:PORT/PATH, answer read as JSON with
an optional "node" field, or tcp://VIP:PORT for a bare connect) and records who answered.
Writes --ready once the first request succeeded, so the caller starts the switchover only
when the baseline is known. Stops once --expect has answered --settle times in a row, or
after --max seconds. Prints one JSON object:

  downtime_s      first answer from --expect minus the last answer before it from elsewhere
                  (or the last success before the gap when answers carry no node)
  answered_by     node -> number of answers
  flapped         an answer from another node came after --expect had answered
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit


def ask(url: str, timeout: float) -> str | None:
    """Who answered ("" when the answer does not say), or None on failure."""
    parts = urlsplit(url)
    try:
        if parts.scheme == "tcp":
            with socket.create_connection((parts.hostname, parts.port), timeout=timeout):
                return ""
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
        try:
            data = json.loads(body)
        except ValueError:
            return ""
        return str(data.get("node", "")) if isinstance(data, dict) else ""
    except (OSError, urllib.error.URLError, ValueError):
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--expect", required=True, help="node that must answer in the end")
    p.add_argument("--ready", required=True, type=Path)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--timeout", type=float, default=0.25)
    p.add_argument("--settle", type=int, default=10)
    p.add_argument("--max", type=float, default=60.0)
    a = p.parse_args()

    start = time.monotonic()
    # (time, who answered or None, answer counts as the new primary's)
    samples: list[tuple[float, str | None, bool]] = []
    streak = 0
    gap_seen = False
    while time.monotonic() - start < a.max:
        t = time.monotonic() - start
        who = ask(a.url, a.timeout)
        if who is not None and not a.ready.exists():
            a.ready.write_text("ok\n")
        gap_seen = gap_seen or who is None
        # Answers that do not name their node count as new once a gap was seen.
        new = who == a.expect or (who == "" and gap_seen)
        samples.append((t, who, new))
        streak = streak + 1 if new else 0
        if streak >= a.settle:
            break
        time.sleep(max(0.0, a.interval - (time.monotonic() - start - t)))

    answered: dict[str, int] = {}
    for _, w, _ in samples:
        if w is not None:
            answered[w or "?"] = answered.get(w or "?", 0) + 1
    first_new = next((i for i, (_, _, new) in enumerate(samples) if new), None)
    result: dict[str, object] = {
        "samples": len(samples),
        "failures": sum(1 for _, w, _ in samples if w is None),
        "answered_by": answered,
        "settled": streak >= a.settle,
        "downtime_s": None,
        "flapped": False,
    }
    if first_new is not None:
        before = [t for t, w, _ in samples[:first_new] if w is not None]
        t_new = samples[first_new][0]
        result["downtime_s"] = round(t_new - before[-1], 3) if before else None
        result["flapped"] = any(w not in (None, "", a.expect) for _, w, _ in samples[first_new:])
    print(json.dumps(result))
    return 0 if result["settled"] and not result["flapped"] else 1


if __name__ == "__main__":
    sys.exit(main())
