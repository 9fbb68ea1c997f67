"""Coverage-guided fuzzing of the rsync signature/delta decoders and patching:
`python tests/fuzz/fuzz_delta.py -runs=N`."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["ha_runtime"]):
    from ha_runtime.replication import delta as D


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    basis = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    for magic in (b"", b"HSG1", b"HDL1"):
        try:
            s = D.Signature.decode(magic + raw)
        except D.DeltaError:
            pass
        else:
            assert s.encode() == magic + raw
        try:
            d = D.Delta.decode(magic + raw)
        except D.DeltaError:
            continue
        assert d.encode() == magic + raw
        try:
            out = D.patch(basis, d)
        except D.DeltaError:
            continue
        assert len(out) == d.length


if __name__ == "__main__":
    atheris.instrument_all()  # instrument_imports misses some modules here (cov stayed flat)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
