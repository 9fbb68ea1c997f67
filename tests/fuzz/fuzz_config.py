"""Coverage-guided fuzzing of module/node file loading (bytes -> YAML -> validation):
`python tests/fuzz/fuzz_config.py -runs=N`."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris
import yaml

with atheris.instrument_imports(include=["ha_runtime"]):
    from ha_runtime.config import check_file, parse_cluster, parse_module

DIR = Path(tempfile.mkdtemp(prefix="hapair-fuzz-config-"))
FILE = DIR / "flightdata.yml"


def test_one_input(data: bytes) -> None:
    FILE.write_bytes(data)
    errors = check_file(FILE, check_files=False)
    assert all(e.startswith(f"{FILE}: ") for e in errors), errors
    # the parsers directly, on whatever YAML the bytes make (when they make any)
    try:
        doc = yaml.safe_load(data.decode("utf-8", "replace"))
    except (yaml.YAMLError, RecursionError):
        return
    for errs in (parse_module(doc, FILE, check_files=False)[1], parse_cluster(doc, FILE)[1]):
        assert all(e.startswith(f"{FILE}: ") for e in errs), errs


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
