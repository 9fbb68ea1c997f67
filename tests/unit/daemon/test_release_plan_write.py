"""The release plan the daemon writes at its start (hapair.service runs it after a death).

What it holds for this node's modules, its atomic replacement, and a state directory it
cannot write (a full disk): logged, and the daemon goes on. Running the plan with the real
nft and ip is tests/integration/vip/test_release_plan.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ha_runtime import release
from tests.sitefactory import module_data, parsed_cluster, parsed_module


def _plan(tmp_path: Path) -> release.ReleasePlan:
    cluster = parsed_cluster(tmp_path)
    rule = {"protocol": "tcp", "ports": [8080], "hash": "address_port"}
    modules = [
        module_data("flightdata", vip="10.77.0.100/24"),
        module_data("weather", "farm", vip="10.77.0.200/24", farm={"rules": [rule]}),
    ]
    return release.release_plan("node1", [parsed_module(tmp_path, m, cluster) for m in modules])


def test_the_plan_names_every_table_and_address_of_this_node(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    commands = [ln for ln in plan.nft.splitlines() if not ln.startswith("#")]
    assert commands == [
        f"{verb} table {family} hapair-farm-weather"
        for family in ("netdev", "arp", "ip")
        for verb in ("add", "delete")
    ]
    assert [ln for ln in plan.ip.splitlines() if not ln.startswith("#")] == [
        "address flush dev lan0 to 10.77.0.100/32",
        "address flush dev lan0 to 10.77.0.200/32",
    ]
    assert release.release_plan("node3", []) == release.release_plan("node3", [])


def test_the_plan_is_replaced_whole(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert release.write_plan(state, release.ReleasePlan("old nft\n", "old ip\n"))
    assert release.write_plan(state, _plan(tmp_path))
    assert (state / release.PLAN_NFT).read_text() == _plan(tmp_path).nft
    assert (state / release.PLAN_IP).read_text() == _plan(tmp_path).ip
    assert sorted(p.name for p in state.iterdir()) == [release.PLAN_IP, release.PLAN_NFT]


def test_a_plan_that_cannot_be_written_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file where the state directory should be")
    with caplog.at_level(logging.WARNING, logger="hapair.release"):
        assert release.write_plan(not_a_dir, _plan(tmp_path)) is False
    assert "cannot write the release plan" in caplog.text
