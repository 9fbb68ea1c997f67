"""Coverage-guided fuzzing of the dirty-log reader: a file of checksummed record frames
(built from the input, so the fuzzer gets past the checksum) plus a torn/garbage tail,
read back as DirtyLog.open does: `python tests/fuzz/fuzz_dirtylog.py -runs=N`."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["ha_runtime"]):
    from ha_runtime.replication.dirtylog import DirtyState
    from ha_runtime.replication.journal import Kind, encode_frame, read_records


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    blob = b""
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        blob += encode_frame(Kind(fdp.ConsumeIntInRange(1, 8)), fdp.ConsumeBytes(
            fdp.ConsumeIntInRange(0, 120)))  # fmt: skip
    tail = fdp.ConsumeBytes(fdp.remaining_bytes())
    recs, good, rejected = read_records(blob + tail)
    assert good <= len(blob + tail)
    assert (good == len(blob + tail)) == (not rejected)
    again, good2, _ = read_records((blob + tail)[:good])  # the repaired file reads clean
    assert again == recs and good2 == good
    state = DirtyState()
    for r in recs:  # what DirtyLog.open does with them
        state.apply(r)
    state.dirty_bytes()
    copy = DirtyState(lost=state.lost)
    for r in state.snapshot_records():  # what compaction writes and reads back
        copy.apply(r)
    assert {k: list(v) for k, v in copy.ranges.items()} == {
        k: list(v) for k, v in state.ranges.items()
    }


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
