"""A real Prometheus server beside the fault campaign, and what its alert rules made of it.

`PrometheusServer` runs /usr/bin/prometheus (Debian's package, `make setup`) on the
controller (the host: the lab's management network ends on its `halab-mgmt` link, as an
operator's monitoring host would), with its own temporary storage and configuration:
every node's /metrics scraped every second, docs/alerts.yml as its rule file, evaluated
every second. Its HTTP API listens on loopback only.

`judge_alerts` then asks it (query_range over the campaign of ALERTS{alertstate="firing"})
whether each injected fault that an alert covers (FAULT_ALERTS, the one table) made that
alert fire, and which alerts were still firing once the lab had healed.

The short campaign loads a copy of the rules with every `for:` cut to `short_for_s`: the
nemesis holds a fault 3-10 s, shorter than most `for:` of the real file (30 s to 2 min).
The long campaign loads docs/alerts.yml unchanged; a fault shorter than an alert's `for:`
then cannot make it fire, and is reported as such rather than required to.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from nemesis import Fault
from observers import METRICS_ADDRESS, NODES
from playrunner import ROOT

RULES = ROOT / "docs" / "alerts.yml"
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
JOB = "hapair"  # the job name docs/alerts.yml's HapairExporterDown expects
SCRAPE_S = 1
EVAL_S = 1
# From a fault's inject to its condition in scraped samples: heartbeat timeout (1 s in
# the lab), the daemon's metrics snapshot age (<= 1.5 s), one scrape, one evaluation.
DETECT_SLACK_S = 3.0
# After the heal (and the site's convergence), an alert caused by the fault may still be
# in its last evaluation: how long after that its firing still counts for the fault.
AFTER_HEAL_S = 10.0
# Firing after the heal with a reason: the quarantine is emptied by an operator, never by
# the lab's healing (docs/replication.md); certificate expiry does not depend on faults.
MAY_LINGER = {
    "HapairSplitBrainQuarantineNotEmpty": "the quarantine is emptied by an operator",
    "HapairTlsCertExpiringSoon": "certificate expiry is not a fault of the campaign",
    "HapairTlsCertExpiring": "certificate expiry is not a fault of the campaign",
}


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Expect:
    """An alert a fault must make fire. `on`: whose series carry it, the faulted node's
    ("target"), the other node's ("other"), or either ("any"); `labels`: more labels the
    firing alert must have; `when`: the fault's parameters for which it applies."""

    alert: str
    on: str = "any"
    labels: tuple[tuple[str, str], ...] = ()
    when: Callable[[Fault], bool] | None = None


def _app(name: str) -> Callable[[Fault], bool]:
    return lambda f: f.params.get("app") == name


FAULT_ALERTS: dict[str, tuple[Expect, ...]] = {
    # The node is off: its exporter unreachable, its peer hears nothing on any network and
    # serves alone (not in sync) until the node is back and resynchronised.
    "crash": (
        Expect("HapairExporterDown", "target"),
        Expect("HapairPeerLost", "other"),
        Expect("HapairReplicationNotInSync", "other"),
    ),
    # Every link cut, management too: as a crash, seen from outside.
    "cut_all": (
        Expect("HapairExporterDown", "target"),
        Expect("HapairPeerLost", "other"),
        Expect("HapairReplicationNotInSync", "other"),
    ),
    "cut_hb": (Expect("HapairHeartbeatNetworkDown", labels=(("network", "hb"),)),),
    "cut_lan": (Expect("HapairHeartbeatNetworkDown", labels=(("network", "lan"),)),),
    # systemd restarts the daemon after 1 s: required only if it stayed down long enough.
    "kill_runtime": (Expect("HapairExporterDown", "target"), Expect("HapairPeerLost", "other")),
    # weather's checker has action `wait`: it fails until the operator restarts the app;
    # flightdata's (action restart) is healed by hapair at once, so rarely long enough.
    "kill_app": (
        Expect("HapairCheckerFailing", "target", (("module", "weather"),), _app("weather")),
        Expect("HapairCheckerFailing", "target", (("module", "flightdata"),), _app("flightdata")),
    ),
    # Not covered by an alert: loss (5-30 %, heartbeats get through), cpu, fill (outside
    # the replicated copy), the operator steps. What fired during them is reported.
}


def fault_duration(f: Fault) -> float:
    """How long the fault itself lasted: a lower bound of how long its alert's condition
    holds (a crashed node is still booting after the heal)."""
    if f.kind == "kill_runtime":
        return float(f.params.get("restarted_after_s", 0.0))
    return (f.t_heal or f.t_inject) - f.t_inject


# ---------------------------------------------------------------------------- rules


def duration_s(text: str | None) -> float:
    """A Prometheus duration ("30s", "2m", "1h30m") in seconds; None or "" is 0."""
    if not text:
        return 0.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return float(sum(int(n) * units[u] for n, u in parts))


def rules_for(short_for_s: float | None, dest: Path) -> tuple[Path, dict[str, float]]:
    """The rule file Prometheus loads (docs/alerts.yml, or a copy with each `for:` cut to
    short_for_s) and each alert's `for:` in seconds."""
    doc = yaml.safe_load(RULES.read_text())
    fors: dict[str, float] = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            f = duration_s(rule.get("for"))
            if short_for_s is not None and f > short_for_s:
                f = short_for_s
                rule["for"] = f"{int(short_for_s * 1000)}ms"
            fors[rule["alert"]] = f
    if short_for_s is None:
        return RULES, fors
    path = dest / "alerts-short-for.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=100))
    return path, fors


# ---------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _route_dev(address: str) -> str:
    out = subprocess.run(
        ["ip", "-o", "route", "get", address], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r" dev (\S+)", out)
    return m.group(1) if m else ""


@dataclass
class PrometheusServer:
    short_for_s: float | None = None
    log: Callable[[str], None] = print
    port: int = 0
    fors: dict[str, float] = field(default_factory=dict)
    rule_file: Path | None = None
    _dir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        for node, address in METRICS_ADDRESS.items():
            # Scrapes must stay in the lab: the management network, through halab-mgmt.
            dev = _route_dev(address.rpartition(":")[0])
            if dev != "halab-mgmt":
                raise RuntimeError(f"{node}'s metrics {address} routed via {dev!r}, not the lab")
        self._dir = Path(tempfile.mkdtemp(prefix="hapair-chaos-prometheus-"))
        self.rule_file, self.fors = rules_for(self.short_for_s, self._dir)
        check = subprocess.run(
            [PROMTOOL, "check", "rules", str(self.rule_file)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if check.returncode != 0:
            raise RuntimeError(
                f"promtool check rules {self.rule_file}: {check.stdout}{check.stderr}"
            )
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_S}s",
                "scrape_timeout": f"{SCRAPE_S}s",
                "evaluation_interval": f"{EVAL_S}s",
            },
            "rule_files": [str(self.rule_file)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "scheme": "http",  # the runtime's exporter serves plain HTTP (metrics.py)
                    "static_configs": [
                        {"targets": [address], "labels": {"node": node}}
                        for node, address in METRICS_ADDRESS.items()
                    ],
                }
            ],
        }
        (self._dir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = _free_port()
        logf = (self._dir / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self._dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        logf.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"prometheus did not start: {tail}")
            time.sleep(0.2)
        rules = "short `for:` copy" if self.short_for_s is not None else "docs/alerts.yml"
        self.log(f"[prometheus] {self.url} (pid {self._proc.pid}), rules: {rules}")
        return self

    def log_tail(self, chars: int = 2000) -> str:
        if self._dir is None or not (self._dir / "prometheus.log").exists():
            return ""
        return (self._dir / "prometheus.log").read_text(errors="replace")[-chars:]

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its files."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=30)
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# ---------------------------------------------------------------------------- judging


@dataclass
class Firing:
    alert: str
    labels: dict[str, str]
    times: list[float]  # wall-clock evaluation times it was firing
    step: float = 1.0

    def starts(self) -> list[float]:
        """When each firing episode began (a gap in the samples ends one)."""
        gap = 1.5 * self.step
        return [t for i, t in enumerate(self.times) if i == 0 or t - self.times[i - 1] > gap]

    def name(self) -> str:
        keep = ("node", "module", "network", "checker")
        extra = ",".join(f"{k}={self.labels[k]}" for k in keep if k in self.labels)
        return f"{self.alert}{{{extra}}}"


def firing_series(prom: PrometheusServer, t0_wall: float, t1_wall: float) -> list[Firing]:
    step = max(1.0, (t1_wall - t0_wall) / 10000)  # the API answers at most 11000 points
    data = prom.api(
        "query_range", query='ALERTS{alertstate="firing"}', start=t0_wall, end=t1_wall, step=step
    )
    out = []
    for series in data["result"]:
        labels = dict(series["metric"])
        times = [float(t) for t, _ in series["values"]]
        out.append(Firing(labels.pop("alertname"), labels, times, step))
    return out


def _other(node: str | None) -> str | None:
    return next((n for n in NODES if n != node), None) if node else None


def judge_alerts(
    prom: PrometheusServer,
    faults: list[Fault],
    *,
    t_start: float,
    end: float,
    wall_offset: float,
    settle_s: float,
) -> tuple[dict[str, Any], list[str]]:
    """Per fault: the alerts FAULT_ALERTS requires of it, those that fired while it lasted,
    what is missing; the alerts firing at the end; the scrape counts. Returns the summary
    section and the violations. Times: CLOCK_MONOTONIC (+ wall_offset for Prometheus)."""
    violations: list[str] = []
    t0_wall, t1_wall = t_start + wall_offset, end + wall_offset
    fired = firing_series(prom, t0_wall - 60, t1_wall)
    per_fault = []
    for f in faults:
        t_heal = f.t_heal if f.t_heal is not None else f.t_inject
        w0 = f.t_inject + wall_offset
        w1 = t_heal + (f.recovered_s if f.recovered_s is not None else settle_s)
        w1 += AFTER_HEAL_S + wall_offset
        during = sorted({x.name() for x in fired if any(w0 <= t <= w1 for t in x.starts())})
        entry: dict[str, Any] = {
            "kind": f.kind,
            "target": f.target,
            "t": round(f.t_inject - t_start, 1),
            "duration_s": round(fault_duration(f), 1),
            "fired": during,  # began firing from the inject to AFTER_HEAL_S after recovery
        }
        required: list[str] = []
        fired_ok: list[str] = []
        too_short: list[str] = []
        missing: list[str] = []
        for exp in FAULT_ALERTS.get(f.kind, ()):
            if exp.when is not None and not exp.when(f):
                continue
            want = dict(exp.labels)
            if exp.on == "target" and f.target:
                want["node"] = f.target
            elif exp.on == "other" and f.target:
                want["node"] = _other(f.target) or ""
            desc = exp.alert + (
                "{" + ",".join(f"{k}={v}" for k, v in sorted(want.items())) + "}" if want else ""
            )
            for_s = prom.fors.get(exp.alert, 0.0)
            # The fault's doing: it began firing after the inject (and after its condition
            # held `for:`), not an alert that was firing already and went on.
            hit = any(
                x.alert == exp.alert
                and all(x.labels.get(k) == v for k, v in want.items())
                and any(w0 + for_s <= t <= w1 for t in x.starts())
                for x in fired
            )
            if fault_duration(f) < for_s + DETECT_SLACK_S:
                too_short.append(f"{desc} ({'fired' if hit else 'not fired'})")
                continue
            required.append(desc)
            (fired_ok if hit else missing).append(desc)
        entry.update(required=required, required_fired=fired_ok, missing=missing)
        if too_short:
            entry["not_required_fault_shorter_than_for"] = too_short
        if missing:
            violations.append(
                f"{f.kind} on {f.target} at t+{f.t_inject - t_start:.1f} "
                f"(held {fault_duration(f):.1f} s): {missing} did not fire "
                f"(fired then: {during or 'none'})"
            )
        per_fault.append(entry)

    # At the end, the lab healed and converged: what still fires.
    final = prom.api("query", query='ALERTS{alertstate="firing"}', time=t1_wall)["result"]
    at_end = [Firing(s["metric"]["alertname"], dict(s["metric"]), []) for s in final]
    lingering = [a.name() for a in at_end if a.alert in MAY_LINGER]
    for a in at_end:
        if a.alert not in MAY_LINGER:
            violations.append(f"{a.name()} still firing after the lab healed and converged")

    window = f"{max(1, round(t1_wall - t0_wall))}s"
    scrapes: dict[str, dict[str, int]] = {}
    for what, q in (("scrapes", "count_over_time"), ("scrapes_ok", "sum_over_time")):
        for s in prom.api("query", query=f'{q}(up{{job="{JOB}"}}[{window}])', time=t1_wall)[
            "result"
        ]:
            scrapes.setdefault(s["metric"].get("node", "?"), {})[what] = int(float(s["value"][1]))
    section = {
        "rules": str(prom.rule_file.relative_to(ROOT))
        if prom.rule_file and prom.rule_file.is_relative_to(ROOT)
        else f"docs/alerts.yml with every for: cut to {prom.short_for_s} s",
        "for_s": prom.fors,
        "scrape_interval_s": SCRAPE_S,
        "evaluation_interval_s": EVAL_S,
        "prometheus_scrapes_by_node": scrapes,
        "alerts_fired": sorted({x.name() for x in fired if any(t >= t0_wall for t in x.starts())}),
        "by_fault": per_fault,
        "firing_at_end": [a.name() for a in at_end],
        "lingering_allowed": {n: MAY_LINGER[n.partition("{")[0]] for n in lingering},
    }
    return section, violations
