"""Data generations, in the manner of DRBD's generation identifiers.

Each copy of a module's data carries a current generation (a random 64-bit id) and the
ids it had before. A node starts a new generation whenever it begins writing without a
replicating peer (ALONE); a secondary in sync adopts the primary's. Comparing two copies
then tells which one is newer (the other's current id is in its history), or that both
changed apart (split brain). The record is persisted atomically with fsync so a power cut
never leaves a node believing it is newer than it is.
"""

from __future__ import annotations

import enum
import json
import os
import secrets
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from ha_runtime.heartbeat.packet import MAX_HISTORY

EMPTY = 0


class Relation(enum.Enum):
    SAME = "same"
    LOCAL_NEWER = "local newer"
    PEER_NEWER = "peer newer"
    DIVERGED = "diverged"


@dataclass(frozen=True)
class Generation:
    current: int = EMPTY
    history: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        """No data era has ever started here: a brand-new node."""
        return self.current == EMPTY

    def advance(self) -> Generation:
        """Start a new era; the old id moves to the history so the peer can still place us."""
        new = secrets.randbits(64) | 1  # never EMPTY
        past = ((self.current,) if not self.empty else ()) + self.history
        return Generation(new, past[:MAX_HISTORY])

    def short(self) -> str:
        return f"{self.current:016x}"[:8] if not self.empty else "empty"


def compare(local: Generation, peer: Generation) -> Relation:
    if local.current == peer.current:
        return Relation.SAME
    if local.empty or local.current in peer.history:
        return Relation.PEER_NEWER
    if peer.empty or peer.current in local.history:
        return Relation.LOCAL_NEWER
    # Neither descends from the other (or too many eras apart to tell): treat as split
    # brain, which is never resolved silently.
    return Relation.DIVERGED


@dataclass(frozen=True)
class GenRecord:
    generation: Generation = field(default_factory=Generation)
    # Set while this node is primary without a replicating peer: the peer's copy is known to
    # be older, so this node may go primary again after a reboot without seeing the peer.
    peer_outdated: bool = False

    def with_generation(self, g: Generation) -> GenRecord:
        return replace(self, generation=g)


class GenerationStore:
    def __init__(self, state_dir: Path, module: str) -> None:
        self.path = state_dir / f"{module}.generation.json"

    def load(self) -> GenRecord:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return GenRecord()
        gen = Generation(int(raw["current"], 16), tuple(int(h, 16) for h in raw["history"]))
        return GenRecord(gen, bool(raw["peer_outdated"]))

    def save(self, rec: GenRecord) -> None:
        data = {
            "current": f"{rec.generation.current:016x}",
            "history": [f"{h:016x}" for h in rec.generation.history],
            "peer_outdated": rec.peer_outdated,
        }
        atomic_write(self.path, (json.dumps(data, indent=1) + "\n").encode())


def atomic_write(path: Path, data: bytes) -> None:
    """Write-temp, fsync, rename, fsync the directory: either the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per writer: two tasks of one process declaring the same file (the
    # link reaching sync while a new generation arrives) must not rename each other's temp.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
