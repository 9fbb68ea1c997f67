"""`hactl release` (systemd ExecStopPost): after a daemon died without cleaning up, the
mirror VIP it held is gone from the interface. Root: runs in a network namespace."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from pathlib import Path
from ha_runtime import vip
from ha_runtime.config import (
    ClusterConfig, HeartbeatSpec, ModuleConfig, NodeSpec, RestartPolicy, ScriptsSpec,
    SiteConfig, TlsSpec, VipSpec,
)
from ha_runtime.release import release_site

t = Path("/nonexistent")
nodes = (NodeSpec("node1", {"lan": "10.77.0.11"}), NodeSpec("node2", {"lan": "10.77.0.12"}))
cluster = ClusterConfig(
    path=t, node="node1", nodes=nodes, heartbeat_port=7440, site_key=t,
    tls=TlsSpec(t, t, t), api_socket=t, metrics_address=None, state_dir=t, modules_dir=t,
)
def mirror(name, address, members):
    return ModuleConfig(
        path=t, name=name, type="mirror", nodes=members, default_primary=members[0],
        failback="manual", vip=VipSpec(address, 24, "hatest0"), heartbeat=HeartbeatSpec(),
        witness=(), scripts=ScriptsSpec(), checkers=(), restart_policy=RestartPolicy(),
        replicated_dirs=(),
    )
held = mirror("flightdata", "10.77.0.100", ("node1", "node2"))
other = mirror("elsewhere", "10.77.0.101", ("node2", "node3"))  # not this node's module
vip.add_vip(held.vip)
vip.add_vip(other.vip)
done = release_site(SiteConfig(cluster, [held, other]))
assert not vip.has_vip(held.vip), done
assert vip.has_vip(other.vip), "another node's module was touched"
assert release_site(SiteConfig(cluster, [held])) == []  # nothing left: a no-op
print("ok", done)
"""


def test_release_drops_the_vip_a_dead_daemon_left(netns: list[str]) -> None:
    # the node's own address first, as on a node: the VIPs are secondary addresses
    subprocess.run([*netns, "ip", "addr", "add", "10.77.0.11/24", "dev", "hatest0"], check=True)
    out = subprocess.run(
        [*netns, sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ['flightdata: removed 10.77.0.100/24']"), out.stdout
