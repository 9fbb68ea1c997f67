"""Replication under faults: network split with and without a witness, secondary disk full.

- With a witness (the lab's site router 10.77.0.1, added to the secondary's module file for
  the test: the lab site has none): cut every link of the secondary; it loses its peer
  *and* the witness, so it goes WAIT, never ALONE, while the primary serves.
- Without a witness (the lab site as deployed): both sides go primary and both are written;
  once the links are back the pair settles with one primary, the yielding side's diverging
  files are kept in a quarantine directory (its database holds the records written there
  during the split), and status and events say so loudly.
- Secondary disk full: the primary goes ALONE with a reason naming the full disk and keeps
  acknowledging writes; once space is freed the pair resyncs; every acknowledged write is
  readable, both databases pass SQLite's integrity check and the copies are identical.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

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


@pytest.fixture
def witness_on(mirror_site: Lab) -> Iterator[tuple[str, str]]:
    """The secondary's module file with `witness: [10.77.0.1]` (hapair restarted there);
    the file as deployed is put back (and hapair restarted) after."""
    primary, secondary = in_sync_pair()
    assert "witness" not in sh(mirror_site, secondary, f"cat {MODULE_FILE}")
    sh(
        mirror_site,
        secondary,
        f"cp {MODULE_FILE} /root/{MODULE}.yml.orig && "
        f"printf 'witness:\\n- {WITNESS}\\n' >> {MODULE_FILE} && "
        f"hactl config check {MODULE_FILE} && systemctl restart hapair",
    )
    assert in_sync_pair() == (primary, secondary)
    deadline = time.monotonic() + 15
    while entry(secondary).get("witness_ok") is not True and time.monotonic() < deadline:
        time.sleep(0.5)
    assert entry(secondary).get("witness_ok") is True, entry(secondary)
    yield primary, secondary
    sh(
        mirror_site,
        secondary,
        f"cp /root/{MODULE}.yml.orig {MODULE_FILE} && systemctl restart hapair",
    )
    in_sync_pair()


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
        filler = mirror_site.fill(secondary, "/var/lib/hapair/replica")
        alone = wait_state(primary, ("ALONE",), 60)
        assert alone["state"] == "ALONE", alone
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
