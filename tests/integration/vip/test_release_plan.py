"""The release plan (hapair.service's first ExecStopPost lines): run by nft and ip as the
unit runs them, it removes a dead daemon's mirror VIP, farm VIP and farm tables, keeps the
node's own address and another node's module, and a second run is a silent no-op.

Root: runs in a network namespace with the real nft and ip, the real farm ruleset.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ha_runtime import release
from ha_runtime.config import FarmSettings, ModuleConfig
from ha_runtime.farm import ruleset
from ha_runtime.farm.spec import FarmSpec
from tests.sitefactory import module_data, parsed_cluster, parsed_module

OWN = "10.77.0.11/24"


def _modules(tmp: Path) -> tuple[list[ModuleConfig], ModuleConfig]:
    mirror = module_data("flightdata", vip="10.77.0.100/24")
    rule = {"protocol": "tcp", "ports": [8080], "hash": "address_port"}
    farm = module_data("weather", "farm", vip="10.77.0.200/24", farm={"rules": [rule]})
    elsewhere = module_data(
        "other", vip="10.77.0.101/24", nodes=["node2", "node3"], default_primary="node2"
    )
    for m in (mirror, farm, elsewhere):
        m["vip"]["interface"] = "hatest0"
    cluster = parsed_cluster(
        tmp,
        nodes=[
            {"name": n, "addresses": {"lan": f"10.77.0.{11 + i}"}}
            for i, n in enumerate(("node1", "node2", "node3"))
        ],
    )
    parsed = [parsed_module(tmp, m, cluster) for m in (mirror, farm, elsewhere)]
    return parsed, parsed[2]


def _sh(netns: list[str], *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*netns, *argv], input=stdin, capture_output=True, text=True, check=False)


def _addresses(netns: list[str]) -> set[str]:
    out = _sh(netns, "ip", "-4", "-j", "addr", "show", "dev", "hatest0").stdout
    return {f"{a['local']}/{a['prefixlen']}" for i in json.loads(out) for a in i["addr_info"]}


def _tables(netns: list[str]) -> set[str]:
    out = _sh(netns, "nft", "-j", "list", "tables").stdout
    return {
        f"{t['table']['family']} {t['table']['name']}"
        for t in json.loads(out)["nftables"]
        if "table" in t
    }


def _run_plan(netns: list[str], state: Path) -> list[subprocess.CompletedProcess[str]]:
    """The plan's two ExecStopPost lines of hapair.service.j2, in their order."""
    return [
        _sh(netns, "nft", "-f", str(state / release.PLAN_NFT)),
        _sh(netns, "ip", "-force", "-batch", str(state / release.PLAN_IP)),
    ]


def test_the_plan_releases_what_a_killed_daemon_left(netns: list[str], tmp_path: Path) -> None:
    modules, elsewhere = _modules(tmp_path)
    farm = next(m for m in modules if m.type == "farm")
    spec = FarmSpec.from_module(farm, farm.farm or FarmSettings())
    assert _sh(netns, "ip", "addr", "add", OWN, "dev", "hatest0").returncode == 0
    # the farm's VIP as the farm service adds it (netif.add_vip): a /32
    for cidr in ("10.77.0.100/24", "10.77.0.200/32", "10.77.0.101/24"):
        assert _sh(netns, "ip", "addr", "add", cidr, "dev", "hatest0").returncode == 0
    installed = _sh(netns, "nft", "-f", "-", stdin=ruleset.render_ruleset(spec, range(128)))
    assert installed.returncode == 0, installed.stderr
    assert f"ip {spec.table}" in _tables(netns)

    state = tmp_path / "state"
    release.write_plan(state, release.release_plan("node1", modules))
    for proc in _run_plan(netns, state):
        assert proc.returncode == 0, proc.stderr

    assert _addresses(netns) == {OWN, "10.77.0.101/24"}, "only the node's own and node2/3's"
    assert not {t for t in _tables(netns) if t.endswith(spec.table)}
    assert (
        elsewhere.vip is not None and "10.77.0.101" not in release.release_plan("node1", modules).ip
    )

    again = _run_plan(netns, state)  # after a normal stop: nothing left, nothing said
    assert [(p.returncode, p.stdout, p.stderr) for p in again] == [(0, "", "")] * 2


def test_a_missing_plan_fails_only_its_own_line(netns: list[str], tmp_path: Path) -> None:
    # ExecStopPost=- ignores this exit; `hactl release` (the third line) still runs.
    procs = _run_plan(netns, tmp_path / "never-written")
    assert all(p.returncode != 0 for p in procs)


@pytest.mark.parametrize("name", [release.PLAN_NFT, release.PLAN_IP])
def test_the_unit_runs_the_plan_before_hactl_release(name: str) -> None:
    unit = (
        Path(__file__).parents[3]
        / "collections/ansible_collections/hapair/cluster/roles/runtime/templates"
        / "hapair.service.j2"
    ).read_text()
    lines = [ln for ln in unit.splitlines() if ln.startswith("ExecStopPost=")]
    plan = [i for i, ln in enumerate(lines) if ln.endswith(f"/{name}")]
    hactl = [i for i, ln in enumerate(lines) if ln.endswith("hactl release")]
    assert plan and hactl and plan[0] < hactl[0], lines
    assert lines[plan[0]].startswith("ExecStopPost=-"), "a missing plan must not fail the stop"
