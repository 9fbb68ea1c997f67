"""Resync while the application keeps rotating and replacing files and directories.

A writer inside the primary node works through the replicated directory without a pause:
logrotate (log.1 -> log.2, log -> log.1, a new log), an atomic save (a file renamed over a
file), a directory replaced by a file and back, a tree removed with rm -rf and made again.
Meanwhile the secondary comes back after a power cut (an incremental resync of what
changed while it was away), then an operator asks for a full checksum resync. Each resync
completes, the application's directory stays mounted and every operation of the writer
succeeds (before, a path changed under the resync ended the primary's replication child and
unmounted the directory under the application), the demo application's acknowledged
records survive, and `verify_resync.yml` finds both copies identical.
"""

from __future__ import annotations

import json
import time
from typing import Any

from labcmd import in_node
from repl import APP_DIR, MODULE, VIP, entry, events, in_sync_pair, sh
from siteplay import run_playbook

from ha_lab.lab import Lab
from ha_lab.records import Writer, read_back

CHURN_DIR = f"{APP_DIR}/churn"
BULK_DIR = f"{APP_DIR}/bulk"
STOP = "/tmp/hapair-churn.stop"
RESULT = "/tmp/hapair-churn.json"
SCRIPT = "/tmp/hapair-churn.py"

# The application: runs until STOP exists, then writes what it saw to RESULT. An error of
# any operation is recorded (ENOTCONN or EIO: the mount went away under it), and so is any
# moment the directory was not a mount point.
CHURN = f"""
import errno, json, os, shutil, time
app, base, stop = "{APP_DIR}", "{CHURN_DIR}", "{STOP}"

def w(p, data):
    with open(p, "wb") as f:
        f.write(data)

def step(n):
    i = n % 8
    log = base + "/logs/app.log"
    if os.path.exists(log + ".1"):
        os.replace(log + ".1", log + ".2")
    if os.path.exists(log):
        os.replace(log, log + ".1")
    w(log, os.urandom(300_000))
    w("%s/save%d.tmp" % (base, i), os.urandom(150_000))
    os.replace("%s/save%d.tmp" % (base, i), "%s/save%d" % (base, i))
    d = "%s/swap%d" % (base, i)
    if os.path.isdir(d) and not os.path.islink(d):
        shutil.rmtree(d)
        w(d, b"a file now %d" % n)
    else:
        if os.path.lexists(d):
            os.unlink(d)
        os.makedirs(d + "/sub")
        w(d + "/sub/x", os.urandom(100_000))
        w(d + "/y", b"y")
    t = "%s/tree%d" % (base, i % 2)
    if os.path.isdir(t):
        shutil.rmtree(t)
    for k in range(4):
        os.makedirs("%s/d%d" % (t, k))
        w("%s/d%d/f" % (t, k), os.urandom(80_000))

os.makedirs(base + "/logs", exist_ok=True)
n, errors, unmounted, started = 0, [], 0, time.time()
while not os.path.exists(stop):
    try:
        step(n)
    except OSError as e:
        errors.append("%s: %s" % (errno.errorcode.get(e.errno, e.errno), e))
    if not os.path.ismount(app):
        unmounted += 1
    n += 1
    time.sleep(0.02)
w("{RESULT}", json.dumps({{"loops": n, "errors": errors[:20], "error_count": len(errors),
                         "unmounted": unmounted, "seconds": time.time() - started}}).encode())
"""

# 48 files of 4 MiB: enough that each resync lasts while the writer works.
MAKE_BULK = f"""
import os
os.makedirs("{BULK_DIR}", exist_ok=True)
for i in range(48):
    with open("{BULK_DIR}/b%02d" % i, "wb") as f:
        f.write(os.urandom(4 << 20))
fd = os.open("{BULK_DIR}", os.O_RDONLY)
os.fsync(fd)
os.close(fd)
"""

# While the secondary is away: 2 MiB rewritten in each bulk file (96 MiB to resync).
REWRITE_BULK = f"""
import os
for i in range(48):
    with open("{BULK_DIR}/b%02d" % i, "r+b") as f:
        f.seek((i % 2) << 20)
        f.write(os.urandom(2 << 20))
"""


def _start_churn(lab: Lab, node: str) -> None:
    sh(lab, node, f"rm -f {STOP} {RESULT}")
    proc = in_node(lab, node, "python3", "-c", f"open({SCRIPT!r}, 'w').write({CHURN!r})")
    assert proc.returncode == 0, proc.stderr
    sh(lab, node, f"nohup python3 {SCRIPT} >/tmp/hapair-churn.out 2>&1 &")


def _stop_churn(lab: Lab, node: str) -> dict[str, Any]:
    sh(lab, node, f"touch {STOP}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        proc = in_node(lab, node, "cat", RESULT)
        if proc.returncode == 0 and proc.stdout.strip():
            result: dict[str, Any] = json.loads(proc.stdout)
            return result
        time.sleep(0.5)
    out = in_node(lab, node, "cat", "/tmp/hapair-churn.out").stdout
    raise AssertionError(f"the writer did not finish: {out[-2000:]}")


def _replication_events(lab: Lab, node: str, since: float) -> list[dict[str, Any]]:
    return [
        e
        for e in events(lab, node)
        if e.get("event") == "replication" and float(e.get("ts", 0)) >= since
    ]


def _verified() -> None:
    result = run_playbook("playbooks/verify_resync.yml", extravars={"module": MODULE})
    assert result.status == "successful", result.failure_summary()
    assert not result.changed, result.changed


def _check_churn(churn: dict[str, Any], figures: dict[str, Any]) -> None:
    print(json.dumps(figures))
    assert churn["unmounted"] == 0, figures
    assert churn["error_count"] == 0, figures
    assert churn["loops"] >= 20, figures  # it really worked throughout


def test_incremental_resync_while_the_application_rotates_and_replaces(
    mirror_site: Lab,
) -> None:
    primary, secondary = in_sync_pair()
    sh(mirror_site, primary, f"rm -rf {CHURN_DIR} {BULK_DIR} && python3 -c '{MAKE_BULK}'",
       timeout=600)  # fmt: skip
    in_sync_pair()
    writer = Writer(VIP).start()
    churning = False
    try:
        assert writer.wait_acks(20)
        mirror_site.crash(secondary)
        _start_churn(mirror_site, primary)
        churning = True
        sh(mirror_site, primary, f"python3 -c '{REWRITE_BULK}'", timeout=300)
        time.sleep(2)
        booted = time.time()
        mirror_site.boot(secondary)
        assert in_sync_pair(timeout=600) == (primary, secondary)
        time.sleep(3)  # in sync, the writer still at it
        churn = _stop_churn(mirror_site, primary)
        churning = False
        assert writer.wait_acks(10, after=time.monotonic())
    finally:
        acks = writer.stop()
        if churning:
            sh(mirror_site, primary, f"touch {STOP}")
        if not entry(secondary):
            mirror_site.boot(secondary)
    mine = _replication_events(mirror_site, primary, booted)
    figures = {
        "churn": churn,
        "started": [e for e in mine if e.get("kind") == "resync_started"],
        "done": [e for e in mine if e.get("kind") == "resync_done"],
    }
    _check_churn(churn, figures)
    assert figures["done"], figures
    result = read_back(VIP, acks)
    assert result.ok, result
    _verified()


def test_full_resync_while_the_application_rotates_and_replaces(mirror_site: Lab) -> None:
    primary, _secondary = in_sync_pair()
    sh(mirror_site, primary,
       f"test -d {BULK_DIR} || python3 -c '{MAKE_BULK}'", timeout=600)  # fmt: skip
    in_sync_pair()
    asked = time.time()
    _start_churn(mirror_site, primary)
    try:
        time.sleep(1)
        proc = in_node(mirror_site, primary, "hactl", "resync", MODULE, "--full", "--wait",
                       timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        # `--wait` may see PRIM before the link drops for the new resync: wait for its end
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not any(
            e.get("kind") == "resync_done" for e in _replication_events(mirror_site, primary, asked)
        ):
            time.sleep(1)
        in_sync_pair(timeout=600)
        time.sleep(2)  # in sync, the writer still at it
    finally:
        churn = _stop_churn(mirror_site, primary)
    mine = _replication_events(mirror_site, primary, asked)
    figures = {
        "churn": churn,
        "started": [e for e in mine if e.get("kind") == "resync_started"],
        "done": [e for e in mine if e.get("kind") == "resync_done"],
        "lost": [e for e in mine if e.get("kind") == "peer_lost"],
    }
    _check_churn(churn, figures)
    assert any(e.get("full") is True for e in figures["started"]), figures
    assert figures["done"], figures
    in_sync_pair()
    _verified()
    sh(mirror_site, primary, f"rm -rf {CHURN_DIR} {BULK_DIR}", timeout=300)
    in_sync_pair()
