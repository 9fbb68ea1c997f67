"""Config validation: the documented examples load, and every mistake is reported at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ha_runtime.cli import main
from ha_runtime.config import check_file, parse_cluster, parse_module

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def _doc_examples() -> tuple[dict[str, object], dict[str, object]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    cluster = next(yaml.safe_load(b) for b in blocks if b.startswith("node:"))
    module = next(yaml.safe_load(b) for b in blocks if b.startswith("name:"))
    return cluster, module


def test_documented_examples_are_valid() -> None:
    cluster_data, module_data = _doc_examples()
    cluster, errors = parse_cluster(cluster_data, Path("/etc/hapair/cluster.yml"))
    assert errors == [] and cluster is not None
    assert cluster.networks == ("hb", "lan") and cluster.heartbeat_port == 7440
    module, errors = parse_module(
        module_data, Path("/etc/hapair/modules/flightdata.yml"), cluster, check_files=False
    )
    assert errors == [] and module is not None
    assert module.vip is not None and module.vip.cidr == "10.77.0.100/24"
    assert module.heartbeat.interval_ms == 100 and module.restart_policy.max_restarts == 3
    assert [c.type for c in module.checkers] == ["tcp", "unit", "interface"]
    assert [c.start_grace_s for c in module.checkers[:2]] == [10.0, 10.0]


def test_defaults() -> None:
    _, module_data = _doc_examples()
    data = {
        k: v for k, v in module_data.items() if k not in ("heartbeat", "restart_policy", "checkers")
    }
    module, errors = parse_module(data, Path("flightdata.yml"), check_files=False)
    assert not errors and module is not None
    assert (module.heartbeat.interval_ms, module.heartbeat.timeout_ms) == (300, 3000)
    assert (module.restart_policy.max_restarts, module.restart_policy.window_s) == (3, 86400)


def test_all_errors_reported_with_file_and_field() -> None:
    _, data = _doc_examples()
    bad = dict(data)
    bad["vip"] = {"address": "10.77.0.300", "interface": "lan0"}
    bad["colour"] = "blue"
    bad["failback"] = "sometimes"
    bad["checkers"] = [
        {"name": "x", "type": "tcp", "port": 0, "bogus": 1},
        {"name": "y", "type": "nope"},
        {"name": "z", "type": "tcp", "port": 80, "start_grace_s": -1},
        {"name": "w", "type": "interface", "start_grace_s": 5},
    ]
    bad["default_primary"] = "node9"
    path = Path("/etc/hapair/modules/flightdata.yml")
    _, errors = parse_module(bad, path, check_files=False)
    text = "\n".join(errors)
    assert (
        "/etc/hapair/modules/flightdata.yml: vip.address: expected an IPv4 address with prefix"
        " like 10.77.0.100/24, got '10.77.0.300'"
    ) in errors
    for needle in (
        "colour: unknown field",
        "failback: expected one of manual, auto",
        "checkers[0].bogus: unknown field",
        "checkers[0].port: expected an integer between 1 and 65535",
        "checkers[1].type: expected one of",
        "checkers[2].start_grace_s: expected a number between 0 and 3600, got -1",
        # The grace is the application's: an interface is not started by a script.
        "checkers[3].start_grace_s: unknown field",
        "default_primary: expected one of nodes",
    ):
        assert needle in text, text
    assert all(e.startswith(f"{path}: ") for e in errors)


def test_cluster_errors() -> None:
    data = {
        "node": "node3",
        "nodes": [
            {"name": "node1", "addresses": {"hb": "10.78.0.11", "lan": "10.77.0.11"}},
            {"name": "node2", "addresses": {"hb": "10.78.0.300"}},
        ],
        "site_key": "relative/key",
        "metrics_address": "nowhere",
    }
    _, errors = parse_cluster(data, Path("c.yml"))
    text = "\n".join(errors)
    for needle in (
        "node: 'node3' is not one of nodes[].name",
        "nodes[1].addresses.hb: expected an IPv4 address",
        "nodes[1].addresses: expected the same networks",
        "site_key: expected an absolute path",
        "tls: required field is missing",
        "metrics_address: expected HOST:PORT",
    ):
        assert needle in text, text


def test_missing_script_and_bad_yaml(tmp_path: Path) -> None:
    _, data = _doc_examples()
    f = tmp_path / "flightdata.yml"
    f.write_text(yaml.safe_dump(data))
    errors = check_file(f)
    assert any("scripts.start_prim: expected an existing executable file" in e for e in errors)
    f.write_text("name: [unclosed\n")
    errors = check_file(f)
    assert len(errors) == 1 and "invalid YAML" in errors[0] and str(f) in errors[0]


def test_hactl_config_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster, module = _doc_examples()
    good = tmp_path / "cluster.yml"
    good.write_text(yaml.safe_dump(cluster))
    assert main(["config", "check", str(good)]) == 0
    bad = tmp_path / "flightdata.yml"
    module = dict(module, vip={"address": "10.77.0.300/24", "interface": "lan0"}, extra=1)
    bad.write_text(yaml.safe_dump(module))
    assert main(["config", "check", "--no-file-checks", "--cluster", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "vip.address" in err and "extra: unknown field" in err and "2 error(s)" in err
