"""VIP add/remove and gratuitous ARP for real, inside a throwaway network namespace."""

from __future__ import annotations

import subprocess
import sys
import uuid

SCRIPT = """
from ha_runtime.config import VipSpec
from ha_runtime import vip
v = VipSpec("10.77.0.100", 24, "hatest0")
assert not vip.has_vip(v)
assert vip.add_vip(v) and vip.has_vip(v)
assert not vip.add_vip(v)  # idempotent
vip.send_garp("hatest0", v.address)
assert vip.remove_vip(v) and not vip.has_vip(v)
assert not vip.remove_vip(v)
print("ok")
"""


def test_vip_in_netns() -> None:
    ns = f"hatest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run = ["ip", "netns", "exec", ns]
        link = ["ip", "link", "add", "hatest0", "type", "veth", "peer", "name", "hatest1"]
        subprocess.run([*run, *link], check=True)
        for dev in ("hatest0", "hatest1"):
            subprocess.run([*run, "ip", "link", "set", dev, "up"], check=True)
        out = subprocess.run(
            [*run, sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "ok"
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
