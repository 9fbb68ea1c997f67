"""A node that gives its VIP up sends no gratuitous ARP for it afterwards.

The second burst of an announcement comes `repeat_after_s` (5 s) after the first. Before
this test, nothing stopped it when the VIP went: after a handover within 5 s of a
promotion, the old holder told the clients the VIP was still at its MAC, and they sent to
it until the new holder's own second burst (the flightdata gaps of 5.3-5.6 s the restart
and key-rotation lab tests caught). Real netlink and a real AF_PACKET capture in a
throwaway namespace, with the runtime's own policy: each case waits past its second burst.
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, socket, struct, sys, threading, time, trio
from ha_runtime.config import VipSpec
from ha_runtime.mirror.vip_ops import NetlinkVip
from ha_runtime.vip import GarpPolicy, has_vip

REPEAT_S = GarpPolicy().repeat_after_s

VIP = VipSpec("10.77.0.100", 24, "hatest0")
hold_s = float(sys.argv[1])
seen = []  # monotonic times of the ARP frames announcing the VIP, seen on the peer end

def capture(stop):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    s.bind(("hatest1", 0))
    s.settimeout(0.05)
    while not stop.is_set():
        try:
            frame = s.recv(128)
        except TimeoutError:
            continue
        if socket.inet_ntoa(frame[28:32]) == VIP.address:  # the sender protocol address
            seen.append(time.monotonic())

class Module:
    vip = VIP

async def main():
    ops = NetlinkVip()
    await ops.add(Module)
    if hold_s:
        await trio.sleep(hold_s)
    await ops.remove(Module)
    removed = time.monotonic()
    assert not has_vip(VIP)
    await trio.sleep(REPEAT_S + 1.5)  # past the second burst
    return removed

stop = threading.Event()
t = threading.Thread(target=capture, args=(stop,), daemon=True)
t.start()
time.sleep(0.1)
try:
    removed = trio.run(main)
finally:
    stop.set()
    t.join()
after = sum(x > removed for x in seen)
print(json.dumps({"before": len(seen) - after, "after": after}))
"""


def _run(netns: list[str], hold_s: float) -> dict[str, int]:
    out = subprocess.run(
        [*netns, sys.executable, "-c", SCRIPT, str(hold_s)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_no_gratuitous_arp_after_the_vip_is_given_up(netns: list[str]) -> None:
    got = _run(netns, 0.5)  # the first burst is out, the second not yet
    assert got["before"] >= 3, got  # the announcement did go out
    assert got["after"] == 0, got


def test_a_vip_given_up_at_once_is_not_announced_after(netns: list[str]) -> None:
    got = _run(netns, 0.0)  # removed before the announcing task ran
    assert got["after"] == 0, got
