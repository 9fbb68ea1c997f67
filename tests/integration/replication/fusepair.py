"""Two replication services of one mirror module on loopback (node1 primary with its FUSE
mount, node2 secondary): the site configuration, a free port, and small helpers shared
by the FUSE integration tests of this folder. Needs root and /dev/fuse where used."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest

from ha_runtime.config import (
    ClusterConfig,
    HeartbeatSpec,
    ModuleConfig,
    NodeSpec,
    RestartPolicy,
    ScriptsSpec,
    TlsSpec,
)
from ha_runtime.replication.service import ReplicationService

_spec = importlib.util.spec_from_file_location(
    "replication_pki", Path(__file__).parents[2] / "unit/replication/conftest.py"
)
assert _spec and _spec.loader
_pki = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pki)
make_site = _pki.make_site

FUSE_ROOT = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="root+FUSE"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def configs(tmp: Path) -> tuple[ModuleConfig, ClusterConfig, ClusterConfig]:
    tls = make_site(tmp / "pki", "a", ("node1", "node2"))
    nodes = (NodeSpec("node1", {"lan": "127.0.0.1"}), NodeSpec("node2", {"lan": "127.0.0.1"}))

    def cluster(n: str) -> ClusterConfig:
        t = tls[n]
        (tmp / n).mkdir(exist_ok=True)
        return ClusterConfig(
            path=tmp / "c.yml", node=n, nodes=nodes, heartbeat_port=7440,
            site_key=tmp / "key", tls=TlsSpec(t.ca, t.cert, t.key), api_socket=tmp / "s",
            metrics_address=None, state_dir=tmp / n, modules_dir=tmp,
        )  # fmt: skip

    module = ModuleConfig(
        path=tmp / "m.yml", name="demo", type="mirror", nodes=("node1", "node2"),
        default_primary="node1", failback="manual", vip=None, heartbeat=HeartbeatSpec(),
        witness=(), scripts=ScriptsSpec(), checkers=(), restart_policy=RestartPolicy(),
        replicated_dirs=(tmp / "app",),
    )  # fmt: skip
    return module, cluster("node1"), cluster("node2")


def write_sync(p: Path, data: bytes, off: int = 0) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def in_step(svc: ReplicationService) -> bool:
    s = svc.status()
    return s.acked_seq == s.last_seq
