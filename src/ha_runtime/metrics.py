"""Prometheus metrics on the management address.

Event-driven families (module state, heartbeat drops, transitions) are updated where the
event happens. Everything else is a snapshot of what the daemon already knows (manager
status, replication children's status, heartbeat counters, TLS files), taken in the trio
loop by ``observe`` once a second and handed whole to the exporter thread: a scrape never
reads the daemon's live structures from another thread. Reference: docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ha_runtime.certtime import cert_not_after
from ha_runtime.heartbeat.packet import Drop
from ha_runtime.node_view import NodeView
from ha_runtime.states import State

# Upper bounds (seconds) of the replication acknowledgement latency histogram: a
# synchronous barrier on a LAN takes a few ms; above a second, applications stall.
ACK_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

REPLICATION_STATES = ("sync", "resyncing", "alone", "idle", "stopped")


def package_version() -> str:
    try:
        return metadata.version("hapair")
    except metadata.PackageNotFoundError:
        return "unknown"


class LatencyHistogram:
    """Cumulative latency histogram a replication child keeps and reports in its status
    (a plain dict: it crosses the pipe to the daemon as JSON)."""

    def __init__(self, buckets: Sequence[float] = ACK_LATENCY_BUCKETS) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1
                break

    def as_dict(self) -> dict[str, Any]:
        return {
            "bounds": list(self.bounds),
            "counts": list(self.counts),
            "count": self.count,
            "sum": round(self.sum, 6),
        }


@dataclass
class Snapshot:
    """Families computed in the trio loop; the exporter thread only yields them."""

    families: list[Metric] = field(default_factory=list)


class _SnapshotCollector:
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        yield from self.snapshot.families  # one reference read: swapped whole by observe()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.state = Gauge(
            "hapair_module_state",
            "1 for the module's current state on this node, 0 for the others",
            ["module", "state"],
            registry=self.registry,
        )
        self.peer_alive = Gauge(
            "hapair_peer_alive",
            "1 while the peer's heartbeats arrive",
            ["module"],
            registry=self.registry,
        )
        self.drops = Counter(
            "hapair_heartbeat_dropped",
            "Heartbeat datagrams dropped, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.transitions = Counter(
            "hapair_transitions",
            "State transitions of each module on this node",
            ["module", "from_state", "to_state"],
            registry=self.registry,
        )
        self.build_info = Gauge(
            "hapair_build_info",
            "Always 1; the labels say which hapair runs here",
            ["version", "node"],
            registry=self.registry,
        )
        self.console_requests = Counter(
            "hapair_console_requests",
            "Web console requests, by outcome (ok, refused reason)",
            ["outcome"],
            registry=self.registry,
        )
        self._snapshot = _SnapshotCollector()
        self.registry.register(self._snapshot)
        for reason in Drop:
            self.drops.labels(reason.value)

    def set_state(self, module: str, state: State) -> None:
        for s in State:
            self.state.labels(module, s.name).set(1 if s is state else 0)

    def on_drop(self, reason: Drop) -> None:
        self.drops.labels(reason.value).inc()

    def on_transition(self, module: str, old: State, new: State) -> None:
        self.transitions.labels(module, old.name, new.name).inc()
        self.set_state(module, new)

    def set_build(self, node: str) -> None:
        self.build_info.labels(package_version(), node).set(1)

    def observe(self, daemon: NodeView) -> None:
        """Snapshot of the daemon's state for the next scrapes (call from the trio loop)."""
        self._snapshot.snapshot = Snapshot(list(node_families(daemon)))

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host, registry=self.registry)


# --------------------------------------------------------------------------- families


def node_families(daemon: NodeView) -> Iterator[Metric]:
    c = daemon.cluster
    alive: dict[str, list[str]] = {}
    for name, m in daemon.modules.items():
        networks = m.heartbeat_networks()
        if networks is not None:
            alive[name] = networks
    yield from heartbeat_families(
        c.networks, alive, daemon.heartbeat.received, daemon.heartbeat.send_errors
    )
    yield CounterMetricFamily(
        "hapair_heartbeat_accepted_key",
        "Heartbeats taken with the other site key of a rotation (site.key.next or .previous)",
        value=float(daemon.heartbeat.accepted_key_packets),
    )
    checkers: dict[tuple[str, str], tuple[bool | None, int]] = {}
    for name, m in daemon.modules.items():
        for cname, st in m.checks.items():
            checkers[(name, cname)] = (st.ok, st.failures)
    yield from checker_families(checkers)
    replication: dict[str, dict[str, Any]] = {}
    raw: dict[str, dict[int, dict[str, Any]]] = {}
    for name, m in daemon.modules.items():
        rep = m.replication_metrics()
        if rep is not None:
            replication[name], raw[name] = rep
    yield from replication_families(replication, raw)
    yield from cert_families({"ca": c.tls.ca, "node": c.tls.cert}, time.time())


def heartbeat_families(
    networks: Iterable[str],
    alive: Mapping[str, Sequence[str]],
    received: Mapping[str, int],
    send_errors: Mapping[str, int],
) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "hapair_heartbeat_network_up",
        "1 while the peer's heartbeats of the module arrive on this network, 0 when lost",
        labels=["module", "network"],
    )
    nets = sorted(networks)
    for module, alive_nets in sorted(alive.items()):
        for net in nets:
            up.add_metric([module, net], 1.0 if net in alive_nets else 0.0)
    yield up
    rx = CounterMetricFamily(
        "hapair_heartbeat_received",
        "Valid heartbeats received, by network",
        labels=["network"],
    )
    tx_err = CounterMetricFamily(
        "hapair_heartbeat_send_errors",
        "Heartbeats that could not be sent, by network",
        labels=["network"],
    )
    for net in nets:
        rx.add_metric([net], float(received.get(net, 0)))
        tx_err.add_metric([net], float(send_errors.get(net, 0)))
    yield rx
    yield tx_err


def checker_families(
    checkers: Mapping[tuple[str, str], tuple[bool | None, int]],
) -> Iterator[Metric]:
    ok = GaugeMetricFamily(
        "hapair_checker_ok",
        "1 if the checker's last probe passed, 0 if it failed (absent before the first)",
        labels=["module", "checker"],
    )
    failures = GaugeMetricFamily(
        "hapair_checker_failures",
        "Consecutive failed probes of the checker (0 once it passes)",
        labels=["module", "checker"],
    )
    for (module, checker), (passed, count) in sorted(checkers.items()):
        if passed is not None:
            ok.add_metric([module, checker], 1.0 if passed else 0.0)
        failures.add_metric([module, checker], float(count))
    yield ok
    yield failures


def replication_families(
    modules: Mapping[str, Mapping[str, Any]],
    raw_children: Mapping[str, Mapping[int, Mapping[str, Any]]],
) -> Iterator[Metric]:
    """From ``ReplicationSupervisor.status()`` per module and each child's raw status (for the
    fields the supervisor's summary leaves out: the ack latency histogram)."""
    d = "module", "dir"
    state = GaugeMetricFamily(
        "hapair_replication_state",
        "1 for the replication state of the directory on this node, 0 for the others",
        labels=[*d, "role", "state"],
    )
    in_sync = GaugeMetricFamily(
        "hapair_replication_in_sync",
        "1 while every directory of the module replicates synchronously",
        labels=["module"],
    )
    inflight_b = GaugeMetricFamily(
        "hapair_replication_inflight_bytes", "Bytes sent and not yet acknowledged", labels=[*d]
    )
    inflight_r = GaugeMetricFamily(
        "hapair_replication_inflight_records",
        "Journal records sent and not yet acknowledged",
        labels=[*d],
    )
    dirty_b = GaugeMetricFamily(
        "hapair_replication_dirty_bytes",
        "Bytes the dirty log records as possibly missing on the peer",
        labels=[*d],
    )
    dirty_p = GaugeMetricFamily(
        "hapair_replication_dirty_paths",
        "Paths the dirty log records as possibly missing on the peer",
        labels=[*d],
    )
    rs_done = GaugeMetricFamily(
        "hapair_resync_bytes_done", "Bytes the running resync has sent", labels=[*d]
    )
    rs_left = GaugeMetricFamily(
        "hapair_resync_bytes_left", "Bytes the running resync has still to send", labels=[*d]
    )
    rs_rate = GaugeMetricFamily(
        "hapair_resync_rate_bytes_per_second", "Rate of the running resync", labels=[*d]
    )
    rs_running = GaugeMetricFamily(
        "hapair_resync_running", "1 while a resync of the directory runs", labels=[*d]
    )
    quarantine = GaugeMetricFamily(
        "hapair_quarantine_entries",
        "Split-brain quarantine directories kept on this node (operator must review)",
        labels=["module"],
    )
    rejected = CounterMetricFamily(
        "hapair_replication_rejected",
        "Replication frames or connections refused, by reason",
        labels=[*d, "reason"],
    )
    latency = HistogramMetricFamily(
        "hapair_replication_ack_latency_seconds",
        "Time from a barrier (fsync) sent to the peer to its acknowledgement",
        labels=[*d],
    )
    for module, st in sorted(modules.items()):
        in_sync.add_metric([module], 1.0 if st.get("in_sync") else 0.0)
        quarantine.add_metric([module], float(len(st.get("quarantine") or [])))
        for i, dd in enumerate(st.get("dirs") or []):
            labels = [module, str(dd.get("dir"))]
            cur = str(dd.get("state", "stopped"))
            for s in (*REPLICATION_STATES, *([cur] if cur not in REPLICATION_STATES else [])):
                state.add_metric([*labels, str(dd.get("role")), s], 1.0 if s == cur else 0.0)
            inflight_b.add_metric(labels, float(dd.get("inflight_bytes") or 0))
            records = int(dd.get("last_seq") or 0) - int(dd.get("acked_seq") or 0)
            inflight_r.add_metric(labels, float(max(0, records)))
            dirty_b.add_metric(labels, float(dd.get("dirty_bytes") or 0))
            dirty_p.add_metric(labels, float(dd.get("dirty_paths") or 0))
            rs = dd.get("resync")
            rs_running.add_metric(labels, 1.0 if rs else 0.0)
            if rs:
                rs_done.add_metric(labels, float(rs.get("bytes_done") or 0))
                rs_left.add_metric(labels, float(rs.get("bytes_left") or 0))
                rs_rate.add_metric(labels, float(rs.get("rate_bps") or 0))
            for reason, n in sorted((dd.get("rejected") or {}).items()):
                rejected.add_metric([*labels, str(reason)], float(n))
            hist = (raw_children.get(module) or {}).get(i, {}).get("ack_latency")
            if isinstance(hist, dict):
                buckets = _cumulative(hist)
                if buckets:
                    latency.add_metric(labels, buckets, float(hist.get("sum") or 0.0))
    yield from (state, in_sync, inflight_b, inflight_r, dirty_b, dirty_p)
    yield from (rs_running, rs_done, rs_left, rs_rate, quarantine, rejected, latency)


def _cumulative(hist: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative, ending with +Inf) from a ``LatencyHistogram`` dict;
    empty if the dict is malformed (a child of another version)."""
    with contextlib.suppress(KeyError, TypeError, ValueError):
        bounds = [float(b) for b in hist["bounds"]]
        counts = [int(c) for c in hist["counts"]]
        total = int(hist["count"])
        if len(bounds) != len(counts):
            return []
        out: list[tuple[str, float]] = []
        running = 0
        for b, n in zip(bounds, counts, strict=True):
            running += n
            out.append((_le(b), float(running)))
        out.append(("+Inf", float(total)))
        return out
    return []


def _le(bound: float) -> str:
    return repr(float(bound))


def cert_families(certs: Mapping[str, Path], now: float) -> Iterator[Metric]:
    expiry = GaugeMetricFamily(
        "hapair_tls_cert_expiry_seconds",
        "Seconds until the TLS certificate expires (negative: expired)",
        labels=["cert", "path"],
    )
    for name, path in sorted(certs.items()):
        not_after = cert_not_after(path)
        if not_after is not None:
            expiry.add_metric([name, str(path)], not_after - now)
    yield expiry
