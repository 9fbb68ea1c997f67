"""What the heartbeat service keeps in `state_dir` across restarts.

- `heartbeat.incarnation`: this node's incarnation, a counter raised (and fsync'd, file
  and directory) before the first heartbeat of each start. It is the larger of the saved
  value + 1 and the wall clock in ns: the counter keeps it growing when the clock steps
  back, the clock keeps it above what peers remember when the file is lost (a new disk)
  and above what a runtime of the time_ns() era announced (rolling upgrade).
- `heartbeat.peers.json`: the highest (incarnation, seq) accepted per stream, so a restart
  of this node does not reopen the packets it had already refused. A new incarnation of a
  peer is saved at once; sequence numbers at most every SAVE_INTERVAL_S, so after a crash
  only the packets of the last few seconds could be replayed, once. Also which peers have
  sent with their pair key (heartbeat.keys): their site-key packets stay refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ha_runtime.generation import atomic_write

log = logging.getLogger(__name__)

INCARNATION_FILE = "heartbeat.incarnation"
PEERS_FILE = "heartbeat.peers.json"
SAVE_INTERVAL_S = 5.0
U64_MAX = 2**64 - 1

StreamKey = tuple[str, str, str]  # sender node, module, network
Mark = tuple[int, int]  # incarnation, seq


def next_incarnation(state_dir: Path, wall_clock_ns: int) -> int:
    """Raise the saved incarnation durably and return it; call before the first send."""
    path = state_dir / INCARNATION_FILE
    previous = 0
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if text:
        try:
            previous = int(text)
        except ValueError:
            # Unreadable: the wall clock alone still orders restarts, as before the file.
            log.warning("%s: expected a decimal integer, got %r; using the wall clock", path, text)
        if not 0 <= previous < U64_MAX:
            log.warning("%s: %d is outside 0..2**64-2; using the wall clock", path, previous)
            previous = 0
    value = min(max(previous + 1, wall_clock_ns), U64_MAX)
    atomic_write(path, f"{value}\n".encode())
    return value


@dataclass
class ReplayState:
    marks: dict[StreamKey, Mark] = field(default_factory=dict)
    pair_keyed: set[str] = field(default_factory=set)  # peers seen signing with a pair key


def load_marks(state_dir: Path) -> ReplayState:
    """What was saved; empty (and said so) when the file is missing or damaged."""
    path = state_dir / PEERS_FILE
    try:
        raw: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return ReplayState()
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); starting without replay memory", path, exc)
        return ReplayState()
    state = ReplayState()
    try:
        for item in raw["streams"]:
            key = (str(item["node"]), str(item["module"]), str(item["network"]))
            state.marks[key] = (int(item["incarnation"]), int(item["seq"]))
        state.pair_keyed = {str(n) for n in raw.get("pair_keyed", [])}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("%s: malformed (%s); starting without replay memory", path, exc)
        return ReplayState()
    return state


def save_marks(state_dir: Path, state: ReplayState) -> None:
    streams = [
        {"node": n, "module": m, "network": w, "incarnation": inc, "seq": seq}
        for (n, m, w), (inc, seq) in sorted(state.marks.items())
    ]
    data = {"streams": streams, "pair_keyed": sorted(state.pair_keyed)}
    atomic_write(state_dir / PEERS_FILE, (json.dumps(data) + "\n").encode())
