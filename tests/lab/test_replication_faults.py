"""Replication under faults: network split with and without a witness, secondary disk full.

- With a witness (the lab's site router 10.77.0.1, added to the secondary's module file for
  the test: the lab site has none): cut every link of the secondary; it loses its peer
  *and* the witness, so it goes WAIT, never ALONE, while the primary serves.
- With a witness on both nodes: cut every link of the primary; it gives the VIP up before
  the secondary's heartbeat timeout lets the secondary take it (never both holding it).
- Without a witness (the lab site as deployed): both sides go primary and both are written;
  once the links are back the pair settles with one primary, the yielding side's diverging
  files are kept in a quarantine directory (its database holds the records written there
  during the split), and status and events say so loudly.
- The primary's replication child killed while the peer is stopped (so nobody can take
  over): the primary restarts the replicator and the application itself and keeps
  acknowledging writes; nothing acknowledged is lost.
- Secondary disk full: the primary goes ALONE with a reason naming the full disk, backs off
  between reconnections that fail at once, and keeps acknowledging writes; once space is
  freed the pair resyncs; every acknowledged write is readable, both databases pass
  SQLite's integrity check and the copies are identical.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from labcmd import in_node
from repl import (
    BACKING,
    MODULE,
    VIP,
    entry,
    events,
    in_sync_pair,
    sh,
    verify,
    wait_state,
)

from ha_lab.lab import Lab
from ha_lab.observe import Probe
from ha_lab.records import Writer, read_back
from ha_lab.topology import node_ns

MODULE_FILE = f"/etc/hapair/modules/{MODULE}.yml"
WITNESS = "10.77.0.1"


def _watch_states(node: str, seconds: float) -> list[str]:
    seen: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        state = entry(node).get("state")
        if state and (not seen or seen[-1] != state):
            seen.append(str(state))
        time.sleep(0.2)
    return seen


@contextmanager
def _with_witness(lab: Lab, nodes: tuple[str, ...]) -> Iterator[None]:
    """These nodes' module files with `witness: [10.77.0.1]` (hapair restarted there); the
    files as deployed are put back (and hapair restarted) after."""
    for node in nodes:
        assert "witness" not in sh(lab, node, f"cat {MODULE_FILE}")
        sh(
            lab,
            node,
            f"cp {MODULE_FILE} /root/{MODULE}.yml.orig && "
            f"printf 'witness:\\n- {WITNESS}\\n' >> {MODULE_FILE} && "
            f"hactl config check {MODULE_FILE} && systemctl restart hapair",
        )
    in_sync_pair()
    deadline = time.monotonic() + 15
    for node in nodes:
        while entry(node).get("witness_ok") is not True and time.monotonic() < deadline:
            time.sleep(0.5)
        assert entry(node).get("witness_ok") is True, entry(node)
    try:
        yield
    finally:
        for node in nodes:
            sh(lab, node, f"cp /root/{MODULE}.yml.orig {MODULE_FILE} && systemctl restart hapair")
        in_sync_pair()


@pytest.fixture
def witness_on(mirror_site: Lab) -> Iterator[tuple[str, str]]:
    """The secondary with a witness."""
    primary, secondary = in_sync_pair()
    with _with_witness(mirror_site, (secondary,)):
        assert in_sync_pair() == (primary, secondary)
        yield primary, secondary


@pytest.fixture
def witness_on_both(mirror_site: Lab) -> Iterator[tuple[str, str]]:
    """Both nodes with a witness."""
    primary, secondary = in_sync_pair()
    with _with_witness(mirror_site, (primary, secondary)):
        yield in_sync_pair()


def test_isolated_node_with_a_witness_never_goes_alone(
    mirror_site: Lab, witness_on: tuple[str, str]
) -> None:
    primary, secondary = witness_on
    cut_wall = time.time()
    mirror_site.cut(secondary, "all")
    try:
        seen = _watch_states(secondary, 6.0)  # six detection timeouts
        assert wait_state(primary, ("ALONE",), 10)["state"] == "ALONE", entry(primary)
    finally:
        mirror_site.restore(secondary)
    assert "ALONE" not in seen and "PRIM" not in seen, seen
    assert "WAIT" in seen, seen
    went = [
        e
        for e in events(mirror_site, secondary)
        if e.get("event") == "transition"
        and e.get("to") in ("ALONE", "PRIM")
        and float(e.get("ts", 0)) >= cut_wall
    ]
    assert not went, went
    assert in_sync_pair() == (primary, secondary)


def _holds_vip(node: str) -> bool | None:
    """Whether the node has the VIP on an interface now (None: it cannot be asked)."""
    proc = subprocess.run(
        ["ip", "-n", node_ns(node), "-4", "-o", "addr", "show"],
        capture_output=True, text=True, timeout=5, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        return None
    return any(tok.split("/")[0] == VIP for tok in proc.stdout.split())


def test_isolated_primary_releases_the_vip_before_the_peer_takes_it(
    mirror_site: Lab, witness_on_both: tuple[str, str]
) -> None:
    """Cut from every network, the primary gives the VIP up before its peer's heartbeat
    timeout lets the peer take it: the two are never seen holding it at once. Both nodes'
    network namespaces are asked from the host, back to back, every few milliseconds."""
    primary, secondary = witness_on_both
    assert _holds_vip(primary) and not _holds_vip(secondary)
    seen: list[tuple[float, bool | None, bool | None]] = []
    cut = time.monotonic()
    mirror_site.cut(primary, "all")
    try:
        while time.monotonic() - cut < 6.0:
            p, q = _holds_vip(primary), _holds_vip(secondary)
            seen.append((time.monotonic() - cut, p, q))
            if q and not p and seen[-1][0] > 3.0:
                break
    finally:
        mirror_site.restore(primary)
    both = [t for t, p, q in seen if p and q]
    released = next((t for t, p, _q in seen if p is False), None)
    taken = next((t for t, _p, q in seen if q), None)
    print(f"isolated primary released the VIP at {released} s, peer held it at {taken} s "
          f"after the cut ({len(seen)} samples)")  # fmt: skip
    assert not both, f"both held {VIP} at {both[:5]} s after the cut"
    assert released is not None and taken is not None, seen[-5:]
    assert released < taken, (released, taken)
    assert in_sync_pair(), "the pair settles again after the heal"


def _post_inside(lab: Lab, node: str, seq: int) -> int:
    """POST a record on the node itself (the VIP is local to a primary)."""
    body = json.dumps({"seq": seq, "writer": "split-brain"})
    proc = in_node(lab, node, "curl", "-sS", "--max-time", "5", "-H",
                   "Content-Type: application/json", "-d", body,
                   f"http://{VIP}:8080/records")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return int(json.loads(proc.stdout)["id"])


def test_split_brain_without_witness_quarantines_the_losing_side(mirror_site: Lab) -> None:
    primary, isolated = in_sync_pair()
    assert "witness" not in sh(mirror_site, isolated, f"cat {MODULE_FILE}")
    split_wall = time.time()
    writer = Writer(VIP).start()
    mirror_site.cut(isolated, "all")
    try:
        assert wait_state(isolated, ("ALONE",), 15)["state"] == "ALONE", entry(isolated)
        assert wait_state(primary, ("ALONE",), 15)["state"] == "ALONE", entry(primary)
        assert writer.wait_acks(50, after=time.monotonic())
        isolated_ids: dict[int, int] = {}
        for i in range(20):
            isolated_ids[_post_inside(mirror_site, isolated, 10_000_000 + i)] = 10_000_000 + i
        sh(mirror_site, isolated, "echo written on the isolated side > /var/lib/flightdata/marker")
    finally:
        acks = writer.stop()
        mirror_site.restore(isolated)
    winner, loser = in_sync_pair(timeout=300)

    # Loud: the loser says SPLIT BRAIN and where its files are; the event log has it.
    lost = entry(loser)
    quarantine = (lost.get("replication") or {}).get("quarantine") or []
    assert quarantine, lost
    kinds = [
        (e.get("event"), e.get("kind"))
        for e in events(mirror_site, loser)
        if float(e.get("ts", 0)) >= split_wall
    ]
    assert ("replication", "split_brain_quarantine") in kinds, kinds
    assert any(
        "SPLIT BRAIN" in str(e.get("reason", ""))
        for e in events(mirror_site, loser)
        if float(e.get("ts", 0)) >= split_wall
    )

    # The loser's diverging files are kept: its database holds what was written on it.
    mine = isolated_ids if loser == isolated else {a.id: a.seq for a in acks}
    found = sh(
        mirror_site,
        loser,
        f"set -e; q=$(ls -d {quarantine[-1]}); d=$(find $q -name {MODULE}.db | head -1); "
        'mkdir -p /tmp/q && cp "$d"* /tmp/q/ && '
        "sqlite3 /tmp/q/flightdata.db 'SELECT id, body FROM records' ; rm -rf /tmp/q",
    )
    kept: dict[int, object] = {}
    for line in found.splitlines():
        rowid, _, body = line.partition("|")
        kept[int(rowid)] = json.loads(body).get("seq")
    missing = {i: s for i, s in mine.items() if kept.get(i) != s}
    assert not missing, f"{len(missing)} records of the losing side not in its quarantine"
    if loser == isolated:
        assert sh(mirror_site, loser, f"cat $(find {quarantine[-1]} -name marker)").strip()

    # Clients reach the winner through the VIP again (the yielding side held it too).
    healed = time.monotonic()
    probe = Probe(VIP, duration=120).start()
    try:
        served = probe.wait_served_by(winner, after=healed, timeout=60)
    finally:
        probe.stop()
    assert served is not None, f"the VIP does not answer from {winner} 60 s after the heal"
    print(json.dumps({"split_winner": winner, "vip_answers_after_heal_s": served - healed}))
    # The winner's own writes are all there.
    if winner == primary:
        result = read_back(VIP, acks)
        assert result.ok, result
    report = verify(mirror_site, winner)
    assert report["equal"], report["dirs"]


def test_secondary_disk_full_primary_goes_alone_no_corruption(mirror_site: Lab) -> None:
    primary, secondary = in_sync_pair()
    writer = Writer(VIP).start()
    filler = ""
    try:
        assert writer.wait_acks(50)
        filled_wall = time.time()
        filler = mirror_site.fill(secondary, "/var/lib/hapair/replica")
        alone = wait_state(primary, ("ALONE",), 60)
        assert alone["state"] == "ALONE", alone
        # Each reconnection fails again at once (the disk is still full): the primary backs
        # off (0.1 s doubling to 2 s) instead of reconnecting in a tight loop, as it did.
        time.sleep(6)
        retries = [
            e
            for e in events(mirror_site, primary)
            if e.get("event") == "replication"
            and e.get("kind") == "resync_started"
            and float(e.get("ts", 0)) >= filled_wall
        ]
        assert len(retries) <= 12, f"{len(retries)} resyncs started against a full disk"
        errors = [d.get("last_error") or "" for d in (alone.get("replication") or {})["dirs"]]
        why = f"{alone.get('reason')} {errors}".lower()
        assert "space" in why or "enospc" in why or "full" in why, alone
        assert writer.wait_acks(50, after=time.monotonic()), entry(primary)
        sh(mirror_site, secondary, f"rm -f {filler} {filler}.tail")
        filler = ""
        in_sync_pair(timeout=300)
        assert writer.wait_acks(50, after=time.monotonic())
    finally:
        acks = writer.stop()
        if filler:
            in_node(mirror_site, secondary, "rm", "-f", filler, f"{filler}.tail")
    result = read_back(VIP, acks)
    assert result.ok, result
    for node in (primary, secondary):
        check = sh(
            mirror_site,
            node,
            f"rm -rf /tmp/ic && mkdir /tmp/ic && cp {BACKING}/{MODULE}.db* /tmp/ic/ && "
            f"sqlite3 /tmp/ic/{MODULE}.db 'PRAGMA integrity_check' && rm -rf /tmp/ic",
        )
        assert check.strip() == "ok", f"{node}: {check}"
    report = verify(mirror_site, primary)
    assert report["equal"], report["dirs"]


def _replica_pid(node: str) -> int:
    dirs = (entry(node).get("replication") or {}).get("dirs") or [{}]
    pid = dirs[0].get("pid")
    assert isinstance(pid, int), entry(node)
    return pid


def test_primary_replication_child_dies_with_no_peer_to_take_over(mirror_site: Lab) -> None:
    """The fault campaign's outage: the primary's replication child died while the peer was
    not in sync, the primary stepped down for a failover nobody could take, and both nodes
    sat in WAIT. Now the primary restarts the replicator and the application itself (the
    peer here is stopped), and no acknowledged write is lost."""
    primary, secondary = in_sync_pair()
    writer = Writer(VIP).start()
    stopped = False
    try:
        assert writer.wait_acks(30)
        sh(mirror_site, secondary, "systemctl stop hapair")
        stopped = True
        assert wait_state(primary, ("ALONE",), 30)["state"] == "ALONE", entry(primary)
        killed_wall = time.time()
        old = _replica_pid(primary)
        sh(mirror_site, primary, f"kill -9 {old}")
        assert writer.wait_acks(30, after=time.monotonic(), timeout=90), entry(primary)
        e = entry(primary)
        assert e.get("state") == "ALONE" and _replica_pid(primary) != old, e
        restarts = [
            ev
            for ev in events(mirror_site, primary)
            if ev.get("event") == "restart" and float(ev.get("ts", 0)) >= killed_wall
        ]
        assert restarts and "replication restarted here" in restarts[0]["reason"], restarts
        sh(mirror_site, secondary, "systemctl start hapair")
        stopped = False
        assert in_sync_pair(timeout=300) == (primary, secondary)
        assert writer.wait_acks(20, after=time.monotonic())
    finally:
        acks = writer.stop()
        if stopped:
            in_node(mirror_site, secondary, "systemctl", "start", "hapair")
    result = read_back(VIP, acks)
    assert result.ok, result
    report = verify(mirror_site, primary)
    assert report["equal"], report["dirs"]
