"""VIP add/remove and gratuitous ARP for real, inside a throwaway network namespace."""

from __future__ import annotations

import subprocess
import sys

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


def test_vip_in_netns(netns: list[str]) -> None:
    out = subprocess.run(
        [*netns, sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
