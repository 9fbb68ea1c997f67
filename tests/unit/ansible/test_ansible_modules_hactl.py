"""Pure parts of the hapair.cluster modules (ha_status, ha_command): status parsing,
idempotence decisions and state matching."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "collections"))

from ansible_collections.hapair.cluster.plugins.module_utils import hactl


def test_parse_status_object_with_module_list() -> None:
    text = json.dumps(
        {
            "node": "node1",
            "modules": [
                {"name": "flightdata", "state": "prim", "peer_state": "SECOND"},
                {"name": "radar", "state": "STOP"},
            ],
        }
    )
    status = hactl.parse_status(text)
    assert status["node"] == "node1"
    assert status["modules"]["flightdata"]["state"] == "PRIM"
    assert status["modules"]["flightdata"]["peer_state"] == "SECOND"
    assert status["modules"]["radar"]["state"] == "STOP"


def test_parse_status_mapping_and_bare_list() -> None:
    by_name = hactl.parse_status(json.dumps({"modules": {"fd": {"state": "SECOND"}}}))
    assert by_name["modules"]["fd"] == {"name": "fd", "state": "SECOND"}
    bare = hactl.parse_status(json.dumps([{"module": "fd", "node": "node2", "state": "UP"}]))
    assert bare["node"] == "node2"
    assert bare["modules"]["fd"]["state"] == "UP"


@pytest.mark.parametrize(
    "text",
    ["not json", json.dumps({"modules": 3}), json.dumps([{"name": "fd"}]), json.dumps([1])],
)
def test_parse_status_rejects_garbage(text: str) -> None:
    with pytest.raises(hactl.HactlError):
        hactl.parse_status(text)


@pytest.mark.parametrize(
    ("action", "state", "expected"),
    [
        ("start", "STOP", True),
        ("start", "SECOND", False),
        ("start", "WAIT", False),
        ("stop", "STOP", False),
        ("stop", "PRIM", True),
        ("prim", "PRIM", False),
        ("prim", "ALONE", False),
        ("prim", "SECOND", True),
        ("second", "SECOND", False),
        ("second", "PRIM", True),
        ("swap", "PRIM", True),
        ("swap", "SECOND", True),
    ],
)
def test_needs_action(action: str, state: str, expected: bool) -> None:
    assert hactl.needs_action(action, state) is expected


def test_needs_action_unknown() -> None:
    with pytest.raises(ValueError, match="unknown action"):
        hactl.needs_action("reboot", "PRIM")


def test_normalize_states() -> None:
    assert hactl.normalize_states(["prim", "Second"]) == ["PRIM", "SECOND"]
    assert hactl.normalize_states(None) == []
    with pytest.raises(ValueError, match="unknown state"):
        hactl.normalize_states(["PRIMARY"])


def test_state_matches_with_sync() -> None:
    second = {"state": "SECOND", "sync": "resyncing"}
    assert hactl.state_matches(second, ["SECOND"])
    assert not hactl.state_matches(second, ["SECOND"], "in-sync")
    assert hactl.state_matches(dict(second, sync="in-sync"), ["SECOND"], "in-sync")
    assert hactl.state_matches({"state": "PRIM"}, ["PRIM", "SECOND"], "in-sync")
    assert not hactl.state_matches(None, ["PRIM"])
