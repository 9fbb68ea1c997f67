"""Only changes travel: resync after node2 was down moves the changed bytes, not the tree.

A tree of >= 1 GiB over >= 10,000 files is written in the replicated directory (through the
primary's mount: it replicates as it is written). The secondary is powered off, 5 % of the
tree changes (ranges rewritten in existing files, new files, deleted files), the secondary
boots. The bytes that cross the lab's switch on the replication port (nftables counters in
the lab's own namespace, both networks, both directions) while it resyncs must be at most
1.1 x the changed bytes plus metadata, the application answering through the VIP
throughout; the runtime's own count is cross-checked; then `verify_resync.yml`, run as an
operator runs it (ansible-runner), passes. Also the playbooks' refusals on a module without
replicated directories.
"""

from __future__ import annotations

import json
import time

from labcmd import in_node
from repl import (
    APP_DIR,
    MODULE,
    REPL_PORT,
    VIP,
    entry,
    events,
    in_sync_pair,
    sh,
    verify,
    wait_state,
)
from siteplay import failure_message, run_playbook

from ha_lab.lab import Lab
from ha_lab.observe import Probe, longest_outage
from ha_lab.records import Writer, read_back
from ha_lab.wire import WireCounter

FILES = 10_240
FILE_SIZE = 112 * 1024  # 10,240 x 112 KiB = 1.09 GiB
TREE = f"{APP_DIR}/tree"
# Metadata allowance: TLS handshake, HELLO, record headers, one path and range per change.
METADATA_FIXED = 4 << 20
METADATA_PER_CHANGE = 1024

MAKE_TREE = f"""
import os, random
rnd = random.Random(4)
for i in range({FILES}):
    d = "{TREE}/d%03d" % (i % 100)
    os.makedirs(d, exist_ok=True)
    with open("%s/f%05d" % (d, i), "wb") as f:
        f.write(rnd.randbytes({FILE_SIZE}))
# durable on both nodes before the crash (a barrier through the mount): writes not yet
# durable on the peer when it goes are rightly noted dirty and resent, over the budget
fd = os.open("{TREE}", os.O_RDONLY)
os.fsync(fd)
os.close(fd)
os.sync()
"""

# 5 %: 512 files get a 96 KiB range rewritten, 64 new files, 64 files deleted.
CHANGE = f"""
import json, os, random
rnd = random.Random(5)
picked = rnd.sample(range({FILES}), 640)
changed, paths = 0, 0
for i in picked[:512]:
    p = "{TREE}/d%03d/f%05d" % (i % 100, i)
    off = rnd.randrange(0, {FILE_SIZE} - 96 * 1024)
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(rnd.randbytes(96 * 1024))
    changed += 96 * 1024; paths += 1
for i in picked[512:576]:
    os.unlink("{TREE}/d%03d/f%05d" % (i % 100, i)); paths += 1
os.makedirs("{TREE}/new", exist_ok=True)
for j in range(64):
    with open("{TREE}/new/n%03d" % j, "wb") as f:
        f.write(rnd.randbytes({FILE_SIZE}))
    changed += {FILE_SIZE}; paths += 1
os.sync()
total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk("{TREE}") for n in ns)
print(json.dumps({{"changed": changed, "paths": paths, "tree": total}}))
"""


def test_refusals_for_a_module_without_replicated_dirs(mirror_site: Lab) -> None:
    result = run_playbook("playbooks/verify_resync.yml", extravars={"module": "weather"})
    assert result.status == "failed"
    messages = " ".join(failure_message(f) for f in result.failures)
    assert "weather has no replicated_dirs" in messages, messages
    result = run_playbook("playbooks/failback.yml", extravars={"module": "weather"})
    assert result.status == "failed"
    messages = " ".join(failure_message(f) for f in result.failures)
    assert "Refused: name a mirror module" in messages and "Nothing was changed" in messages
    assert not result.changed


def test_resync_moves_only_the_changes(mirror_site: Lab) -> None:
    primary, secondary = in_sync_pair()
    sh(mirror_site, primary, f"rm -rf {TREE} && python3 -c '{MAKE_TREE}'", timeout=900)
    in_sync_pair()
    try:
        mirror_site.crash(secondary)
        changes = json.loads(sh(mirror_site, primary, f"python3 -c '{CHANGE}'"))
        assert changes["tree"] >= 1 << 30 and FILES >= 10_000
        assert 0.045 <= changes["changed"] / changes["tree"] <= 0.06, changes
        probe = Probe(VIP, duration=900).start()
        with WireCounter(REPL_PORT) as wire:
            booted = time.monotonic()
            mirror_site.boot(secondary)
            in_sync_pair(timeout=600)
            synced = time.monotonic()
        samples = probe.stop()
        outage = longest_outage(samples, booted, synced)
        sent = wire.to_port + wire.from_port
        budget = 1.1 * changes["changed"] + METADATA_FIXED + METADATA_PER_CHANGE * changes["paths"]
        done = [
            e
            for e in events(mirror_site, primary)
            if e.get("event") == "replication" and e.get("kind") == "resync_done"
        ]
        figures = {
            **changes,
            "wire_to_secondary": wire.to_port,
            "wire_to_primary": wire.from_port,
            "budget": budget,
            "resync_s": round(synced - booted, 1),
            "runtime": done[-1] if done else None,
            "longest_outage_s": outage,
        }
        print(json.dumps(figures))
        assert sent <= budget, figures
        assert outage < 1.0, figures
        # The runtime's own count agrees with the wire (within the framing).
        assert done, figures
        runtime_bytes = int(done[-1].get("bytes_done", 0))
        assert changes["changed"] * 0.95 <= runtime_bytes <= wire.to_port, figures

        result = run_playbook("playbooks/verify_resync.yml", extravars={"module": MODULE})
        assert result.status == "successful", result.failure_summary()
        assert not result.changed, result.changed
        reports = [
            str(e["event_data"].get("res", {}).get("msg", ""))
            for e in result.of("runner_on_ok")
            if e["event_data"].get("task") == "Check every copy is identical"
        ]
        assert reports and "Identical on both nodes: flightdata" in reports[0], reports
    finally:
        if not entry(secondary):
            mirror_site.boot(secondary)
        sh(mirror_site, primary, f"rm -rf {TREE}", timeout=600)
    in_sync_pair()


# --------------------------------------------------------------------------- activity log

HOT_DIR = f"{APP_DIR}/al"
HOT_FILE_MIB = 256
HOT_REGION_MIB = 16  # the rewrites land in the first 4 extents (random all over: all hot)


def test_primary_crashing_in_sync_comes_back_with_an_incremental_resync(
    mirror_site: Lab,
) -> None:
    """The primary crashes while in sync with writes flowing (a power cut: the client's
    records and in-place rewrites in 16 MiB of a 256 MiB file); the peer takes over and more is
    written; the old primary boots. Its activity log says what it may hold that the peer
    never got: the resync is incremental (no checksum pass over the tree), nothing
    acknowledged is lost, both copies are equal."""
    primary, secondary = in_sync_pair()
    sh(mirror_site, primary,
       f"mkdir -p {HOT_DIR} && dd if=/dev/urandom of={HOT_DIR}/big bs=1M "
       f"count={HOT_FILE_MIB} conv=fsync status=none", timeout=600)  # fmt: skip
    in_sync_pair()
    rewrite = (  # in-place 4 KiB writes in the first 16 MiB, fdatasync every 8
        f"python3 -c 'import os,random\nr=random.Random(9)\n"
        f'fd=os.open("{HOT_DIR}/big",os.O_WRONLY)\n'
        f"for i in range(1<<30):\n"
        f" os.pwrite(fd,r.randbytes(4096),r.randrange({HOT_REGION_MIB}<<20))\n"
        f" i%8 or os.fdatasync(fd)\n'"
    )
    writer = Writer(VIP).start()
    booted_wall = 0.0
    try:
        assert writer.wait_acks(30)
        in_node(mirror_site, primary, "sh", "-c", f"nohup {rewrite} >/dev/null 2>&1 &")
        time.sleep(2)
        mirror_site.crash(primary)
        assert wait_state(secondary, ("ALONE", "PRIM"), 60).get("state") == "ALONE"
        assert writer.wait_acks(30, after=time.monotonic(), timeout=90), entry(secondary)
        sh(mirror_site, secondary,
           f"dd if=/dev/urandom of={HOT_DIR}/big bs=1M count=8 seek=100 conv=notrunc,fsync "
           f"status=none")  # fmt: skip
        with WireCounter(REPL_PORT) as wire:
            booted = time.monotonic()
            booted_wall = time.time()
            mirror_site.boot(primary)
            assert in_sync_pair(timeout=600) == (secondary, primary)
            synced = time.monotonic()
        assert writer.wait_acks(20, after=time.monotonic())
    finally:
        acks = writer.stop()
        if not entry(primary):
            mirror_site.boot(primary)
    mine = [
        e
        for e in events(mirror_site, secondary)
        if e.get("event") == "replication" and float(e.get("ts", 0)) >= booted_wall
    ]
    started = [e for e in mine if e.get("kind") == "resync_started"]
    figures = {
        "resync_s": round(synced - booted, 1),
        "wire_to_secondary": wire.to_port,
        "wire_to_primary": wire.from_port,
        "resync_started": started,
        "full_needed": [e for e in mine if e.get("kind") == "resync_full_needed"],
        "done": [e for e in mine if e.get("kind") == "resync_done"][-1:],
    }
    print(json.dumps(figures))
    assert started and all(e.get("full") is False for e in started), figures
    assert not figures["full_needed"], figures
    assert started[0].get("peer_activity", {}).get("ranges", 0) >= 1, figures
    # the hot extents (4 x 4 MiB), what the new primary wrote (8 MiB) and the application's
    # records: not the file's 256 MiB
    assert wire.to_port < 64 << 20, figures
    result = read_back(VIP, acks)
    assert result.ok, result
    report = verify(mirror_site, secondary)
    assert report["equal"], report["dirs"]
    sh(mirror_site, secondary, f"rm -rf {HOT_DIR}")
