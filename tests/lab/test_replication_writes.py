"""No acknowledged write is lost: a client posts records through the VIP and logs every 201.

Three faults, each in the middle of the client's loop (issue 4, "Must show"):
1. the primary node crashes (power cut): after failover every logged id is readable, with
   the body that was acknowledged, from the new primary;
2. the primary crashes *during a resync* of its peer: the half-resynced secondary must not
   take over (its copy is not up to date); once the primary is back every logged id is
   readable and the pair resyncs to identical copies;
3. the secondary crashes: the primary goes ALONE and keeps acknowledging; every id is
   readable, and once the secondary is back it resyncs and the copies are identical.

The tests judge the pair as they find it (whichever node is primary).
"""

from __future__ import annotations

import time

from repl import APP_DIR, VIP, entry, events, in_sync_pair, other, sh, verify, wait_state

from ha_lab.lab import Lab
from ha_lab.records import Ack, Writer, read_back

BEFORE = 100  # acknowledgements before the fault
AFTER = 100  # acknowledgements after it


def _assert_all_readable(acks: list[Ack], expect_node: str) -> None:
    assert len(acks) >= BEFORE + AFTER, f"only {len(acks)} writes acknowledged"
    ids = [a.id for a in acks]
    assert len(set(ids)) == len(ids), "an id acknowledged twice: a write was lost, its id reused"
    result = read_back(VIP, acks)
    assert result.ok, (
        f"{len(result.missing)} of {result.checked} acknowledged records missing "
        f"(first {result.missing[:20]}), {len(result.wrong)} with another body "
        f"({result.wrong[:5]}), errors {result.errors[:5]}"
    )
    assert result.served_by == [expect_node], result.served_by


def test_primary_crash_loses_no_acknowledged_write(mirror_site: Lab) -> None:
    primary, survivor = in_sync_pair()
    writer = Writer(VIP).start()
    try:
        assert writer.wait_acks(BEFORE), f"no writes acknowledged by {primary}"
        crashed_at = time.monotonic()
        mirror_site.crash(primary)
        assert writer.wait_acks(AFTER, after=crashed_at, timeout=60), (
            f"{survivor} did not acknowledge writes after the crash: {entry(survivor)}"
        )
    finally:
        acks = writer.stop()
    assert entry(survivor)["state"] == "ALONE", entry(survivor)
    _assert_all_readable(acks, survivor)

    mirror_site.boot(primary)
    prim, second = in_sync_pair()
    assert (prim, second) == (survivor, primary)
    report = verify(mirror_site, prim)
    assert report["equal"], report


def test_primary_crash_during_resync_loses_no_acknowledged_write(mirror_site: Lab) -> None:
    primary, secondary = in_sync_pair()
    writer = Writer(VIP).start()
    try:
        assert writer.wait_acks(BEFORE)
        mirror_site.crash(secondary)
        assert wait_state(primary, ("ALONE",), 30)["state"] == "ALONE", entry(primary)
        # Enough changes while the peer is away that its resync lasts a few seconds.
        sh(mirror_site, primary, f"mkdir -p {APP_DIR}/bulk && for i in $(seq 1 12); do "
           f"head -c 50000000 /dev/urandom > {APP_DIR}/bulk/while-away-$i; done")  # fmt: skip
        assert writer.wait_acks(AFTER, after=time.monotonic())
        mirror_site.boot(secondary)
        # Crash the primary as soon as it reports the resync under way.
        deadline = time.monotonic() + 120
        seen: dict[str, object] = {}
        while time.monotonic() < deadline:
            seen = entry(primary).get("replication") or {}
            if seen.get("state") == "resyncing" and (seen.get("resync") or {}).get("bytes_left"):
                break
            time.sleep(0.05)
        assert seen.get("state") == "resyncing", f"no resync seen on {primary}: {seen}"
        crashed_wall = time.time()
        mirror_site.crash(primary)
        time.sleep(5)  # several detection timeouts
        # The half-resynced copy is not up to date: it must never serve.
        half = entry(secondary)
        assert half["state"] not in ("ALONE", "PRIM"), half
        assert not [
            e
            for e in events(mirror_site, secondary)
            if e.get("event") == "transition"
            and e.get("to") in ("ALONE", "PRIM")
            and float(e.get("ts", 0)) >= crashed_wall
        ]
        mirror_site.boot(primary)
        # The last primary comes back with the newest copy and serves again.
        assert writer.wait_acks(AFTER, after=time.monotonic(), timeout=120), (
            f"no writes acknowledged after {primary} came back: {entry(primary)}"
        )
    finally:
        acks = writer.stop()
    _assert_all_readable(acks, primary)
    prim, _ = in_sync_pair(timeout=300)
    assert prim == primary
    report = verify(mirror_site, prim)
    assert report["equal"], report["dirs"]
    sh(mirror_site, prim, f"rm -rf {APP_DIR}/bulk")


def test_secondary_crash_loses_no_acknowledged_write(mirror_site: Lab) -> None:
    primary, secondary = in_sync_pair()
    writer = Writer(VIP).start()
    try:
        assert writer.wait_acks(BEFORE)
        crashed_at = time.monotonic()
        mirror_site.crash(secondary)
        assert writer.wait_acks(AFTER, after=crashed_at, timeout=60), entry(primary)
        alone = entry(primary)
        assert alone["state"] == "ALONE", alone
        mirror_site.boot(secondary)
        assert other(primary) == secondary
        in_sync_pair()
        assert writer.wait_acks(AFTER, after=time.monotonic())  # PRIM again, still writing
    finally:
        acks = writer.stop()
    _assert_all_readable(acks, primary)
    report = verify(mirror_site, primary)
    assert report["equal"], report["dirs"]
