"""The Prometheus exposition of a real node daemon, scraped and parsed as Prometheus would.

Two real daemons on loopback (only the VIP is faked); replication families from the
supervisor's real status summary of children whose status is a real ReplicationStatus."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ha_runtime.config import load_site
from ha_runtime.daemon import NodeDaemon
from ha_runtime.metrics import (
    LatencyHistogram,
    Metrics,
    cert_families,
    package_version,
    replication_families,
)
from ha_runtime.mirror.supervisor import DirChild, ReplicationSupervisor
from ha_runtime.replication.context import ReplicationStatus
from ha_runtime.states import State
from tests.sitefactory import free_port, pair_daemons, wait

from .pki import make_ca, make_cert
from .site import pair_site

KEY = b"m" * 48

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample of the exposition text, keyed by name and label set."""
    text = generate_latest(registry).decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


CHECKER = frozenset({("module", "flightdata"), ("checker", "alive")})
LAN = frozenset({("module", "flightdata"), ("network", "lan")})
ALONE = frozenset({("module", "flightdata"), ("state", "ALONE")})


async def scraped(d: NodeDaemon, pred: Callable[[Samples], bool], timeout: float = 15) -> Samples:
    """Scrape until `pred` holds (the last scrape once `timeout` passed)."""
    deadline = trio.current_time() + timeout
    while True:
        s = scrape(d.metrics.registry)
        if pred(s) or trio.current_time() > deadline:
            return s
        await trio.sleep(0.1)


def test_daemon_metrics_scraped(tmp_path: Path) -> None:
    holders: dict[str, str] = {}
    port = free_port()
    d1, d2 = pair_daemons(
        (pair_site(tmp_path, "node1", port), pair_site(tmp_path, "node2", port)), KEY, holders
    )
    m1, m2 = d1.modules["flightdata"], d2.modules["flightdata"]
    seen: dict[str, Samples] = {}

    async def main() -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(d1.run)
            async with trio.open_nursery() as n2:
                n2.start_soon(d2.run)
                await wait(lambda: m1.state is State.PRIM and m2.state is State.SECOND)
                # The daemon snapshots once a second; the checker's first probe may be later.
                seen["pair"] = await scraped(
                    d1, lambda s: s.get(("hapair_checker_ok", CHECKER)) == 1
                )
                n2.cancel_scope.cancel()
            await wait(lambda: not m1.peer_view().alive)
            # The network is reported down a tick before the module moves to ALONE.
            seen["alone"] = await scraped(
                d1,
                lambda s: (
                    s.get(("hapair_heartbeat_network_up", LAN)) == 0
                    and s.get(("hapair_module_state", ALONE)) == 1
                ),
            )
            outer.cancel_scope.cancel()

    trio.run(main)
    pair, alone = seen["pair"], seen["alone"]
    assert value(pair, "hapair_build_info", version=package_version(), node="node1") == 1
    assert package_version() not in ("", "unknown")
    assert value(pair, "hapair_module_state", module="flightdata", state="PRIM") == 1
    assert value(pair, "hapair_module_state", module="flightdata", state="SECOND") == 0
    # Every transition of the audit log is counted (node1 goes WAIT->ALONE->PRIM->ALONE,
    # or WAIT->PRIM->ALONE if node2 was heard first); the shutdown's is not yet.
    moves = [(e["from"], e["to"]) for e in d1.events.read("flightdata")
             if e["event"] == "transition" and e["to"] != "STOP"]  # fmt: skip
    assert moves[-1] == ("PRIM", "ALONE")
    counted = {
        (dict(k[1])["from_state"], dict(k[1])["to_state"]): v
        for k, v in alone.items()
        if k[0] == "hapair_transitions_total"
    }
    assert counted == {m: float(moves.count(m)) for m in set(moves)}
    assert value(pair, "hapair_heartbeat_network_up", module="flightdata", network="lan") == 1
    assert value(pair, "hapair_heartbeat_received_total", network="lan") > 0
    assert value(pair, "hapair_checker_ok", module="flightdata", checker="alive") == 1
    assert value(pair, "hapair_checker_failures", module="flightdata", checker="alive") == 0
    # The node certificate of the test site is valid for 2 days.
    left = value(pair, "hapair_tls_cert_expiry_seconds", cert="node",
                 path=str(d1.cluster.tls.cert))  # fmt: skip
    assert 86400 < left <= 2 * 86400
    # The peer gone: the network is reported down, the module ALONE.
    assert value(alone, "hapair_heartbeat_network_up", module="flightdata", network="lan") == 0
    assert value(alone, "hapair_module_state", module="flightdata", state="ALONE") == 1


class _Registry(CollectorRegistry):
    pass


class _Families:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def test_replication_metrics_from_supervisor_status(tmp_path: Path) -> None:
    site = load_site(pair_site(tmp_path, "node1", 7000, replicated=7441))
    module = next(m for m in site.modules if m.name == "flightdata")
    sup = ReplicationSupervisor(site.cluster, module, lambda *_: None)
    hist = LatencyHistogram()
    for t in (0.0004, 0.003, 0.003, 0.8, 7.0):
        hist.observe(t)
    resyncing = ReplicationStatus(
        role="primary", state="resyncing", link="connected", last_seq=120, acked_seq=100,
        inflight_bytes=65536, dirty_bytes=3 << 20, dirty_paths=4,
        resync={"kind": "full", "bytes_done": 1 << 20, "bytes_left": 3 << 20,
                "rate_bps": 524288, "eta_s": 6.0, "files_done": 2, "queued_s": None},
        rejected={"bad_tag": 2}, ack_latency=hist.as_dict(),
    )  # fmt: skip
    sup.role = "primary"
    for i, d in enumerate(module.replicated_dirs):
        sup.children[i] = DirChild(i, d, "primary", status=resyncing.as_dict())
    quarantine = sup.layouts[0].quarantine_root / "20261205T000000.000000Z"
    quarantine.mkdir(parents=True)
    registry = _Registry()
    fams = list(
        replication_families(
            {"flightdata": sup.status(None)},
            {"flightdata": {i: c.status for i, c in sup.children.items()}},
        )
    )
    registry.register(_Families(fams))  # type: ignore[arg-type]
    s = scrape(registry)
    d = {"module": "flightdata", "dir": str(module.replicated_dirs[0])}
    assert value(s, "hapair_replication_state", **d, role="primary", state="resyncing") == 1
    assert value(s, "hapair_replication_state", **d, role="primary", state="sync") == 0
    assert value(s, "hapair_replication_in_sync", module="flightdata") == 0
    assert value(s, "hapair_replication_inflight_bytes", **d) == 65536
    assert value(s, "hapair_replication_inflight_records", **d) == 20
    assert value(s, "hapair_replication_dirty_bytes", **d) == 3 << 20
    assert value(s, "hapair_replication_dirty_paths", **d) == 4
    assert value(s, "hapair_resync_running", **d) == 1
    assert value(s, "hapair_resync_bytes_done", **d) == 1 << 20
    assert value(s, "hapair_resync_bytes_left", **d) == 3 << 20
    assert value(s, "hapair_resync_rate_bytes_per_second", **d) == 524288
    assert value(s, "hapair_quarantine_entries", module="flightdata") == 1
    assert value(s, "hapair_replication_rejected_total", **d, reason="bad_tag") == 2
    h = "hapair_replication_ack_latency_seconds"
    assert value(s, f"{h}_bucket", **d, le="0.0005") == 1
    assert value(s, f"{h}_bucket", **d, le="0.005") == 3
    assert value(s, f"{h}_bucket", **d, le="1.0") == 4
    assert value(s, f"{h}_bucket", **d, le="+Inf") == 5
    assert value(s, f"{h}_count", **d) == 5
    assert abs(value(s, f"{h}_sum", **d) - 7.8064) < 1e-6


def test_malformed_child_histogram_is_left_out(tmp_path: Path) -> None:
    status = {
        "in_sync": True,
        "quarantine": [],
        "dirs": [{"dir": "/srv/a", "role": "primary", "state": "sync"}],
    }
    raw = {"m": {0: {"ack_latency": {"bounds": [0.1, 0.2], "counts": [1]}}}}
    fams = {f.name: f for f in replication_families({"m": status}, raw)}
    assert fams["hapair_replication_ack_latency_seconds"].samples == []
    assert [x.value for x in fams["hapair_replication_in_sync"].samples] == [1.0]


def test_cert_expiry_of_an_expiring_and_a_missing_cert(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", days=30)
    crt, _ = make_cert(tmp_path / "ca", ca, "node1", days=3)
    now = time.time()
    fam = next(cert_families({"node": crt, "gone": tmp_path / "nope.crt", "ca": ca[0]}, now))
    got = {x.labels["cert"]: x.value for x in fam.samples}
    assert set(got) == {"node", "ca"}  # an unreadable file is absent, not 0
    assert 2 * 86400 < got["node"] <= 3 * 86400
    assert 29 * 86400 < got["ca"] <= 30 * 86400


def test_metrics_registry_has_build_info_before_any_daemon() -> None:
    m = Metrics()
    m.set_build("nodeX")
    s = scrape(m.registry)
    assert value(s, "hapair_build_info", version=package_version(), node="nodeX") == 1
