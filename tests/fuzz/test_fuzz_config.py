"""Module and node files: anything a file can hold yields errors naming the file, the field
and what was expected, never an unhandled exception.

test_runtime_config.py checks hand-picked mistakes; here arbitrary YAML values, arbitrary
file bytes, and the documented examples with one field replaced by junk at any depth.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ha_runtime.config import ConfigError, check_file, load_module, parse_cluster, parse_module

SETTINGS = settings(max_examples=150, deadline=None)
DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
_blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
CLUSTER = next(yaml.safe_load(b) for b in _blocks if b.startswith("node:"))
MODULE = next(yaml.safe_load(b) for b in _blocks if b.startswith("name:"))
MPATH = Path("/etc/hapair/modules/flightdata.yml")
CPATH = Path("/etc/hapair/cluster.yml")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["node1", "10.77.0.11", "10.77.0.100/24", "tcp", "/bin/true", "lan", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)
    ),
    max_leaves=12,
)


def _assert_reported(errors: list[str], path: Path) -> None:
    assert all(isinstance(e, str) and e.startswith(f"{path}: ") for e in errors), errors


@SETTINGS
@given(data=values)
def test_arbitrary_values_give_errors_not_exceptions(data: Any) -> None:
    cluster, errors = parse_cluster(data, CPATH)
    _assert_reported(errors, CPATH)
    assert cluster is not None or errors
    _module, errors = parse_module(data, MPATH, check_files=False)
    _assert_reported(errors, MPATH)
    assert errors  # nothing random is a complete module file


def _leaves(obj: Any, where: str = "") -> list[str]:
    """Field paths as the config parsers name them: a.b, a[0].b."""
    out = [where] if where else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _leaves(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _leaves(v, f"{where}[{i}]")
    return out


def _replace(obj: Any, where: str, value: Any) -> Any:
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", where)
    obj = yaml.safe_load(yaml.safe_dump(obj))  # deep copy
    cur = obj
    for p in parts[:-1]:
        cur = cur[int(p[1:-1])] if p.startswith("[") else cur[p]
    last = parts[-1]
    if last.startswith("["):
        cur[int(last[1:-1])] = value
    else:
        cur[last] = value
    return obj


# Values no field of either file accepts (no field is a list of lists of mappings).
JUNK = [[[{"x": None}]], -(2**80)]


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_one_bad_field_is_named_with_file_and_field(data: st.DataObject) -> None:
    for doc, path, parse in (
        (MODULE, MPATH, lambda d: parse_module(d, MPATH, check_files=False)),
        (CLUSTER, CPATH, lambda d: parse_cluster(d, CPATH)),
    ):
        where = data.draw(st.sampled_from(_leaves(doc)))
        junk = data.draw(st.sampled_from(JUNK))
        _, errors = parse(_replace(doc, where, junk))
        _assert_reported(errors, path)
        # the bad field itself, or the list/mapping holding it, is named with what was expected
        top = re.split(r"[.\[]", where)[0]
        named = [e for e in errors if e.startswith(f"{path}: {top}")]
        assert named, (where, errors)
        assert any("expected" in e or "unknown field" in e for e in named), (where, errors)


@SETTINGS
@given(raw=st.binary(max_size=200) | values.map(lambda v: yaml.safe_dump(v).encode()))
def test_arbitrary_file_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "flightdata.yml"
        f.write_bytes(raw)
        errors = check_file(f, check_files=False)
        _assert_reported(errors, f)
        try:
            load_module(f, check_files=False)
        except ConfigError as exc:
            _assert_reported(exc.errors, f)
            assert exc.errors


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"name: \xff\xfe\n", "invalid YAML: not UTF-8"),  # used to raise UnicodeDecodeError
        (b"[" * 1000, "invalid YAML: nested too deeply"),  # used to raise RecursionError
    ],
)
def test_undecodable_files_regression(raw: bytes, needle: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "flightdata.yml"
        f.write_bytes(raw)
        errors = check_file(f, check_files=False)
        assert len(errors) == 1 and errors[0].startswith(f"{f}: ") and needle in errors[0]
        with pytest.raises(ConfigError):
            load_module(f, check_files=False)
