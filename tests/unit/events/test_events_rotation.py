"""The audit log rotates by size on the real file system, losing no event, read in order."""

from __future__ import annotations

from pathlib import Path

from ha_runtime.events import EventLog


def _seqs(log: EventLog, module: str | None = None) -> list[int]:
    return [int(r["seq"]) for r in log.read(module)]


def test_rotation_keeps_every_event_in_order(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_bytes=2000, keep=50)
    for i in range(300):
        log.append("flightdata" if i % 2 else "radar", "transition", seq=i)
    rotated = sorted(tmp_path.glob("events.jsonl.*"))
    assert len(rotated) >= 5, "the log never rotated"
    for f in [path, *rotated]:
        assert f.stat().st_size <= 2000, f"{f.name} grew past the size bound"
    # Across the rotated files, oldest first: nothing lost, nothing out of order.
    assert _seqs(log) == list(range(300))
    assert _seqs(log, "radar") == list(range(0, 300, 2))
    assert [int(r["seq"]) for r in log.read(None, 7)] == list(range(293, 300))


def test_rotation_keeps_only_n_files(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_bytes=1000, keep=3)
    for i in range(400):
        log.append("flightdata", "transition", seq=i)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2", "events.jsonl.3"]
    seqs = _seqs(log)
    # The retained window is contiguous and ends with the newest event.
    assert seqs == list(range(seqs[0], 400)) and seqs[0] > 0
    # A reopened log (daemon restart) carries on in the same files.
    again = EventLog(path, max_bytes=1000, keep=3)
    again.append("flightdata", "transition", seq=400)
    assert _seqs(again)[-2:] == [399, 400]


def test_default_bound_is_16_mib_and_5_files(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    assert (log.max_bytes, log.keep) == (16 << 20, 5)
