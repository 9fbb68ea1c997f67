"""The campaign's monitoring checks on made-up inputs (no lab): the rule file the short
campaign loads, firing episodes, and which console failures a fault excuses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from alerting import PROMTOOL, RULES, Firing, duration_s, rules_for
from campaign import CONSOLE_BACK_S, console_verdict
from nemesis import Fault
from observers import Poll, StateRound


def test_durations() -> None:
    assert duration_s("2m") == 120
    assert duration_s("1h30m") == 5400
    assert duration_s("1500ms") == 1.5
    assert duration_s(None) == 0
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        duration_s("2 minutes")


def test_short_copy_cuts_every_for_and_passes_promtool(tmp_path: Path) -> None:
    real_path, real = rules_for(None, tmp_path)
    assert real_path == RULES
    assert real["HapairPeerLost"] == 30 and real["HapairReplicationNotInSync"] == 120
    path, short = rules_for(1.0, tmp_path)
    assert path != RULES and short.keys() == real.keys()
    assert all(v == min(real[k], 1.0) for k, v in short.items())
    check = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # Only the `for:` changed: same expressions, labels and annotations.
    a, b = yaml.safe_load(RULES.read_text()), yaml.safe_load(path.read_text())
    for ra, rb in zip(a["groups"][0]["rules"], b["groups"][0]["rules"], strict=True):
        assert {k: v for k, v in ra.items() if k != "for"} == {
            k: v for k, v in rb.items() if k != "for"
        }


def test_firing_episodes() -> None:
    f = Firing("HapairPeerLost", {}, [100.0, 101.0, 102.0, 105.0, 106.0], step=1.0)
    assert f.starts() == [100.0, 105.0]


def test_console_failures_excused_only_while_the_node_is_down() -> None:
    crash = Fault("crash", "node1", "primary", {}, t_inject=10.0, t_heal=20.0)
    rounds = [StateRound(t, {"node2": {}}) for t in range(0, 60, 1)]
    for r in rounds:
        if r.t >= 30:  # node1's runtime answers hactl again from t=30
            r.modules["node1"] = {}
    polls = [
        Poll("node1", "console", 25.0, 30.0, "timeout"),  # down: excused
        Poll("node1", "console", 30.0 + CONSOLE_BACK_S - 1, 30.0 + CONSOLE_BACK_S, "refused"),
        Poll("node1", "console", 40.0, 40.1, "refused"),  # back for 10 s: a violation
        Poll("node2", "metrics", 15.0, 15.1, "refused"),  # the other node: a violation
        Poll("node2", "console", 16.0, 16.2, None),
    ]
    section, violations = console_verdict(polls, [crash], rounds, 0.0, 60.0)
    stats = section["polls_by_node"]
    assert stats["node1"]["console"]["failed_excused"] == 2
    assert stats["node1"]["console"]["failed_not_excused"] == 1
    assert stats["node2"]["metrics"]["failed_not_excused"] == 1
    assert stats["node2"]["console"]["answered"] == 1
    assert len(violations) == 2
    assert "node1's console" in violations[0] and "t+40.0" in violations[0]
