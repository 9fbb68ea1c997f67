"""docs/alerts.yml: valid for Prometheus, each alert fires on the series it is meant for
(promtool unit tests in alerts_test.yml), and it only names metrics hapair exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from ha_runtime.metrics import (
    Metrics,
    cert_families,
    checker_families,
    heartbeat_families,
    replication_families,
)

ROOT = Path(__file__).parents[3]
RULES = ROOT / "docs" / "alerts.yml"
RULE_TESTS = Path(__file__).parent / "alerts_test.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"  # apt: prometheus (Makefile)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], check=False, capture_output=True, text=True, timeout=120
    )


def test_rules_are_valid() -> None:
    r = _promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 10 rules found" in r.stdout


def test_each_alert_fires_on_its_fault() -> None:
    r = _promtool("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_firing_test_case() -> None:
    alerts = {
        rule["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for rule in g["rules"]
    }
    fired = {
        case["alertname"]
        for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in t["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert alerts == fired


class _Families:
    def __init__(self, families: list[object]) -> None:
        self.families = families

    def collect(self) -> list[object]:
        return self.families


def test_rules_name_only_exported_metrics(tmp_path: Path) -> None:
    """A renamed metric would leave an alert silent for ever: every hapair_* name in an
    expression must be in the exposition of the real families."""
    m = Metrics()
    status = {"in_sync": False, "quarantine": [], "dirs": [{"dir": "/d", "state": "sync"}]}
    cert = tmp_path / "none.crt"
    fams = [
        *heartbeat_families(["lan"], {"m": []}, {}, {}),
        *checker_families({("m", "c"): (False, 2)}),
        *replication_families({"m": status}, {}),
        *cert_families({"node": cert}, 0.0),
    ]
    registry = CollectorRegistry()
    registry.register(_Families(fams))  # type: ignore[arg-type]
    text = generate_latest(m.registry).decode() + generate_latest(registry).decode()
    exported = set(re.findall(r"^# TYPE (hapair_\w+)", text, re.M))
    used = set(re.findall(r"\bhapair_\w+", RULES.read_text()))
    used = {u for u in used if not u.startswith("hapair_cluster")}
    assert used, "no hapair metric in the rules?"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
