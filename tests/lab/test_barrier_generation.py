"""An fsync acknowledged after the replication link was lost survives a failover.

The network the primary's replication link rides on is cut (`hb`, or the lan if the link
went there; the heartbeats go on over the other one). A writer on the primary appends a
numbered line to a file of the replicated directory and fsyncs it, over and over, logging
every fsync that returned. The primary is crashed (power cut) right after the first fsync
that returned without the peer (the first one started after the cut: its acknowledgement
could not come over the cut link). The peer, which still hears the primary until the crash,
must then not serve a copy that lacks an acknowledged line: it refuses to take over (WAIT),
or every line is in its copy.

Before the fix the fsync returned as soon as the link was declared lost and the primary
crashed before its peer heard of the new data generation: the peer took over on "same
generation" without the last acknowledged lines.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable

from repl import APP_DIR, BACKING, REPL_PORT, entry, in_sync_pair, other, sh

from ha_lab.lab import Lab

NAME = "barrier-generation.log"
NETWORKS = {"hb": "10.78.0.", "lan": "10.77.0."}  # the lab's (README), replication on either
REPLICATION_TIMEOUT_S = 1.0  # the lab site's replication.timeout_ms
# Runs on the primary: one line per fsync that returned, "seq started ended" (monotonic).
WRITER = f"""
import os, sys, time
fd = os.open("{APP_DIR}/{NAME}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
seq = 0
while True:
    seq += 1
    os.write(fd, b"%d\\n" % seq)
    t0 = time.monotonic()
    os.fsync(fd)
    print(seq, t0, time.monotonic(), flush=True)
"""


Ack = tuple[int, float, float]  # seq, fsync started, fsync returned


class NodeWriter:
    def __init__(self, lab: Lab, node: str) -> None:
        self.acks: list[Ack] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            lab.exec_argv(node, ["python3", "-c", WRITER]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            seq, t0, t1 = line.split()
            with self.cond:
                self.acks.append((int(seq), float(t0), float(t1)))
                self.cond.notify_all()

    def wait(self, pred: Callable[[Ack], bool], timeout: float) -> Ack | None:
        """The first acknowledgement for which pred(ack) holds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hit = next((a for a in self.acks if pred(a)), None)
                left = deadline - time.monotonic()
                if hit is not None or left <= 0:
                    return hit
                self.cond.wait(left)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def _replication_network(lab: Lab, primary: str) -> str:
    """The network the primary's replication link rides on (its established connection)."""
    out = sh(lab, primary, f"ss -Htn state established '( dport = :{REPL_PORT} )'")
    peers = [line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()]
    assert len(peers) == 1, f"not one replication connection on {primary}: {out!r}"
    for name, prefix in NETWORKS.items():
        if peers[0].startswith(prefix):
            return name
    raise AssertionError(f"replication link to {peers[0]}: on no known network")


def _states_seen(node: str, seconds: float) -> list[str]:
    seen: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        state = entry(node).get("state")
        if state and (not seen or seen[-1] != state):
            seen.append(str(state))
        time.sleep(0.2)
    return seen


def test_fsync_acknowledged_alone_is_not_lost_by_a_failover(mirror_site: Lab) -> None:
    primary, peer = in_sync_pair()
    assert peer == other(primary)
    # Both networks carry heartbeats, so cutting one leaves the other (no fault in force).
    assert entry(peer).get("peer_networks") == ["hb", "lan"], entry(peer)
    sh(mirror_site, primary, f"rm -f {APP_DIR}/{NAME}")
    writer = NodeWriter(mirror_site, primary)
    crashed = False
    try:
        assert writer.wait(lambda a: a[0] >= 50, 60), "the writer's fsyncs do not return"
        net = _replication_network(mirror_site, primary)
        cut = time.monotonic()
        mirror_site.cut(primary, net)  # heartbeats go on over the other network
        # The first fsync that waited for the lost link (acknowledged in sync it takes
        # milliseconds; the loss is declared up to a replication timeout after the last
        # answer). Those started just after the cut may still be acknowledged by the peer
        # before the cut takes hold: safe, and not the case under test.
        alone = writer.wait(
            lambda a: a[1] >= cut and a[2] - a[1] >= 0.3 * REPLICATION_TIMEOUT_S, 60
        )
        # Crash as soon as the first fsync acknowledged without the peer is seen.
        mirror_site.crash(primary)
        crashed = True
        assert alone is not None, f"no fsync waited for the {net} cut: {entry(primary)}"
        crash_after_ack = time.monotonic() - alone[2]
        acked = [a[0] for a in writer.acks]
    except BaseException:
        if crashed:  # the pair must not stay one node short for the tests after this one
            mirror_site.boot(primary)
        raise
    finally:
        writer.stop()
        if not crashed:
            mirror_site.restore(primary)
    try:
        print(
            f"fsync across the link loss took {alone[2] - alone[1]:.2f} s (seq {alone[0]});"
            f" primary crashed {crash_after_ack:.3f} s after it returned"
        )
        seen = _states_seen(peer, 10.0)  # ten heartbeat timeouts of the lab site (1 s)
        if [s for s in seen if s in ("ALONE", "PRIM")]:
            # Serving: it must hold every acknowledged line.
            text = sh(mirror_site, peer, f"cat {BACKING}/{NAME} 2>/dev/null || true")
            missing = sorted(set(acked) - {int(x) for x in text.split()})
            assert not missing, (
                f"{peer} took over ({seen}) without {len(missing)} acknowledged fsyncs (seq"
                f" {missing[:10]}; the first acknowledged without it: {alone[0]}): {entry(peer)}"
            )
        else:
            assert seen and seen[-1] == "WAIT", seen
            print(f"{peer} refused to take over: {entry(peer).get('reason')}")
    finally:
        # The crashed primary comes back with the newest copy; the pair settles.
        mirror_site.boot(primary)
        in_sync_pair(timeout=300)
