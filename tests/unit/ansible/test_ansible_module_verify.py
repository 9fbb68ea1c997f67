"""Pure parts of hapair.cluster.ha_verify and the `resync` action of ha_command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "collections"))

from ansible_collections.hapair.cluster.plugins.module_utils import hactl


def test_parse_verify_equal_and_different() -> None:
    text = json.dumps(
        {
            "message": "flightdata: 3 files compared with node2: DIFFERENT",
            "equal": False,
            "dirs": [
                {"dir": "/var/lib/a", "equal": True, "files": 2, "differences": []},
                {
                    "dir": "/var/lib/b",
                    "equal": False,
                    "files": 1,
                    "differences": ["x.db: primary f:aa, secondary missing"],
                },
            ],
        }
    )
    report = hactl.parse_verify(text)
    assert not report["equal"]
    assert report["files"] == 3
    assert report["dirs"][0]["equal"] and not report["dirs"][1]["equal"]
    assert report["dirs"][1]["differences"] == ["x.db: primary f:aa, secondary missing"]


def test_parse_verify_a_difference_wins_over_a_claimed_equal() -> None:
    text = json.dumps({"equal": True, "dirs": [{"dir": "/d", "equal": True, "differences": ["p"]}]})
    report = hactl.parse_verify(text)
    assert not report["equal"] and not report["dirs"][0]["equal"]


@pytest.mark.parametrize("text", ["not json", "[]", '{"dirs": {}}', '{"dirs": [{"equal": true}]}'])
def test_parse_verify_rejects_garbage(text: str) -> None:
    with pytest.raises(hactl.HactlError):
        hactl.parse_verify(text)


def test_resync_always_acts() -> None:
    assert "resync" in hactl.ACTIONS
    for state in hactl.STATES:
        assert hactl.needs_action("resync", state)
