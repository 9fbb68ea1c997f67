"""benchmarks/peer_glusterfs.py: figures from one run's rows, gluster's CLI text (no lab)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchmarks.peer_glusterfs import (
    BRICK,
    BRICK_TLS,
    FUSE_ONLY,
    GLUSTERFS,
    GLUSTERFS_TLS,
    MOUNT,
    MOUNT_TLS,
    PLACES,
    TLS_OPTIONS,
    VOLUME,
    VOLUME_TLS,
    figures_of,
    parse_volume_get,
    peer_connected,
    rotated,
    volume_create_argv,
)

# Throughput of each place relative to the local disk, each run.
SCALE = {"local": 1.0, FUSE_ONLY: 0.5, "replicated": 0.3, GLUSTERFS: 0.1, GLUSTERFS_TLS: 0.06}


def rows(runs: int = 2) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for run in range(runs):
        for where in rotated(PLACES, run):  # the order the benchmark visits them in
            k = SCALE[where] * (1 + run)  # the machine twice as fast in run 1
            cpu: dict[str, float] = {}
            if where == "replicated":
                cpu = {"cpu_hapair_primary_s": 0.3, "cpu_hapair_secondary_s": 0.2}
            if where == GLUSTERFS:
                cpu = {"cpu_glusterfs_client_s": 0.4, "cpu_glusterfs_brick_primary_s": 0.1,
                       "cpu_glusterfs_brick_secondary_s": 0.1}  # fmt: skip
            if where == GLUSTERFS_TLS:
                cpu = {"cpu_glusterfs_tls_client_s": 0.8, "cpu_glusterfs_tls_brick_primary_s": 0.3,
                       "cpu_glusterfs_tls_brick_secondary_s": 0.3}  # fmt: skip
            out += [
                {"run": run, "where": where, "workload": "4k_fdatasync", "ops": 1000 * k,
                 "lat": [0.001 / k] * 500, **cpu},
                {"run": run, "where": where, "workload": "1m_sequential", "mbps": 800 * k,
                 "mib": 256, **cpu},
                {"run": run, "where": where, "workload": "sqlite_commits", "commits": 500 * k},
                {"run": run, "where": where, "workload": "sqlite_delete_commits",
                 "commits": 100 * k},
            ]  # fmt: skip
    return out


def by_name(figs: list[Any]) -> dict[str, Any]:
    return {f.figure: f for f in figs}


def test_each_place_is_first_once_and_all_are_visited_every_run() -> None:
    orders = [rotated(PLACES, run) for run in range(len(PLACES))]
    assert [o[0] for o in orders] == list(PLACES)
    assert all(sorted(o) == sorted(PLACES) for o in orders)
    assert rotated(PLACES, len(PLACES)) == list(PLACES)


def test_hapair_over_glusterfs_is_taken_run_by_run_against_the_issue_targets() -> None:
    f = by_name(figures_of(rows(), {"seconds": 3.0}))
    versus = f["4k_fdatasync_hapair_vs_glusterfs"]
    # Run 1 is twice as fast for every place: the pair's ratio stays 3 in each run.
    assert versus.samples == [pytest.approx(3.0)] * 2 and versus.unit == "repl/glusterfs"
    assert versus.target == ">= 3" and versus.passed is True
    seq = f["1m_sequential_hapair_vs_glusterfs"]
    assert seq.target == ">= 2" and seq.passed is True
    assert f["sqlite_commits_hapair_vs_glusterfs"].target == ">= 3"
    # Samples follow run order although the rows of a run come rotated.
    assert f["1m_sequential_glusterfs"].samples == [pytest.approx(80.0), pytest.approx(160.0)]
    assert f["1m_sequential_glusterfs"].anchor == "1m_sequential_local"
    assert f["sqlite_commits_ratio_glusterfs"].median == pytest.approx(0.1)
    assert f["sqlite_commits_ratio_replicated"].median == pytest.approx(0.3)
    assert f["4k_fdatasync_fuse_only"].samples == [pytest.approx(500.0), pytest.approx(1000.0)]
    # The rollback-journal variant is shown beside the demo's WAL workload, with no target;
    # results of a run without it (older files) leave it out instead of failing.
    delete = f["sqlite_delete_commits_hapair_vs_glusterfs"]
    assert delete.target == "" and delete.passed is None
    older = [r for r in rows() if r["workload"] != "sqlite_delete_commits"]
    assert not any(x.figure.startswith("sqlite_delete") for x in figures_of(older, {}))


def test_glusterfs_with_tls_is_reported_beside_the_target_peer_without_a_target() -> None:
    f = by_name(figures_of(rows(), {}))
    tls = f["1m_sequential_hapair_vs_glusterfs_tls"]
    assert tls.samples == [pytest.approx(5.0)] * 2 and tls.unit == "repl/glusterfs_tls"
    assert tls.target == "" and tls.passed is None
    assert f["sqlite_commits_glusterfs_tls"].anchor == "sqlite_commits_local"
    assert f["4k_fdatasync_cpu_glusterfs_tls_total"].samples == [pytest.approx(2.8)] * 2
    # Results of runs before the TLS volume existed: no TLS figure, no failure.
    older = [r for r in rows() if r["where"] != GLUSTERFS_TLS]
    assert not any("glusterfs_tls" in x.figure for x in figures_of(older, {}))


def test_the_tls_volume_is_apart_and_encrypts_both_ways_against_its_own_ca() -> None:
    argv = volume_create_argv("node1", "node2", VOLUME_TLS, BRICK_TLS)
    assert argv[4] == VOLUME_TLS and argv[7:9] == [
        f"10.78.0.11:{BRICK_TLS}",
        f"10.78.0.12:{BRICK_TLS}",
    ]
    # Process lookups match whole argv words: neither volume's brick nor mount names the other's.
    assert len({BRICK, BRICK_TLS, MOUNT, MOUNT_TLS}) == 4
    options = dict(TLS_OPTIONS)
    assert options["client.ssl"] == options["server.ssl"] == "on"
    assert {options[k] for k in ("ssl.own-cert", "ssl.private-key", "ssl.ca-list")} <= {
        f"/var/lib/hapair-bench-glusterfs/tls/{n}"
        for n in ("glusterfs.pem", "glusterfs.key", "glusterfs.ca")
    }


def test_a_slower_hapair_fails_the_target() -> None:
    slow = [
        {**r, "ops": r["ops"] / 2} if r["where"] == "replicated" and "ops" in r else r
        for r in rows()
    ]
    versus = by_name(figures_of(slow, {}))["4k_fdatasync_hapair_vs_glusterfs"]
    assert versus.median == pytest.approx(1.5) and versus.passed is False


def test_cpu_per_operation_of_each_system_and_its_total() -> None:
    f = by_name(figures_of(rows(), {}))
    # 0.4 + 0.1 + 0.1 s of GlusterFS CPU over 500 ops; 0.3 + 0.2 s of hapair's.
    assert f["4k_fdatasync_cpu_glusterfs_total"].samples == [pytest.approx(1.2)] * 2
    assert f["4k_fdatasync_cpu_replicated_total"].samples == [pytest.approx(1.0)] * 2
    assert f["4k_fdatasync_cpu_glusterfs_client"].samples == [pytest.approx(0.8)] * 2
    assert f["1m_sequential_cpu_hapair_secondary"].samples == [pytest.approx(200 / 256)] * 2
    assert "4k_fdatasync_cpu_fuse_only_total" not in f  # one process: no total


def test_latency_p99_of_every_place_against_the_local_disk() -> None:
    f = by_name(figures_of(rows(), {}))
    assert f["4k_fdatasync_p99_glusterfs"].anchor == "4k_fdatasync_p99_local"
    assert f["4k_fdatasync_p99_glusterfs"].samples == [pytest.approx(10.0)]
    assert not f["4k_fdatasync_p99_local"].anchor


def test_volume_is_created_replica_2_on_the_heartbeat_addresses() -> None:
    argv = volume_create_argv("node2", "node1")
    assert argv == ["gluster", "--mode=script", "volume", "create", VOLUME, "replica", "2",
                    f"10.78.0.12:{BRICK}", f"10.78.0.11:{BRICK}", "force"]  # fmt: skip
    assert not BRICK.startswith("/var/lib/flightdata")  # not in hapair's replicated dir


PEER_STATUS = """Number of Peers: 1

Hostname: 10.78.0.12
Uuid: 4c1d9e1a-2b1e-4f0e-9d7b-0a3b3c6d1e2f
State: {state}
"""


def test_peer_connected_only_in_cluster_and_connected() -> None:
    ok = PEER_STATUS.format(state="Peer in Cluster (Connected)")
    assert peer_connected(ok, "10.78.0.12")
    assert not peer_connected(ok, "10.78.0.11")
    assert not peer_connected(PEER_STATUS.format(state="Peer in Cluster (Disconnected)"),
                              "10.78.0.12")  # fmt: skip
    assert not peer_connected(PEER_STATUS.format(state="Accepted peer request (Connected)"),
                              "10.78.0.12")  # fmt: skip
    other_names = ok.replace("Uuid:", "Other names:\n10.78.0.12\nUuid:").replace(
        "Hostname: 10.78.0.12", "Hostname: node2"
    )
    assert peer_connected(other_names, "10.78.0.12")
    assert not peer_connected("Number of Peers: 0\n", "10.78.0.12")


def test_volume_get_output_is_read_option_by_option() -> None:
    out = (
        "Option                                   Value                                   \n"
        "------                                   -----                                   \n"
        "performance.write-behind                 off                                     \n"
        "cluster.eager-lock                       on                                      \n"
    )
    assert parse_volume_get(out) == {"performance.write-behind": "off", "cluster.eager-lock": "on"}
