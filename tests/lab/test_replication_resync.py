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

from repl import APP_DIR, MODULE, REPL_PORT, VIP, entry, events, in_sync_pair, sh
from siteplay import failure_message, run_playbook

from ha_lab.lab import Lab
from ha_lab.observe import Probe, longest_outage
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
