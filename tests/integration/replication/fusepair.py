"""Two replication services of one mirror module on loopback (node1 primary with its FUSE
mount, node2 secondary): the site configuration, a free port, and small helpers shared
by the FUSE integration tests of this folder. Needs root and /dev/fuse where used."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from ha_runtime.config import (
    ClusterConfig,
    ModuleConfig,
)
from ha_runtime.replication.service import ReplicationService
from tests.sitefactory import replication_cluster, replication_module

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


def configs(tmp: Path) -> tuple[ModuleConfig, ClusterConfig, ClusterConfig]:
    tls = make_site(tmp / "pki", "a", ("node1", "node2"))
    c1, c2 = (replication_cluster(tmp, n, tls[n]) for n in ("node1", "node2"))
    for n in ("node1", "node2"):
        (tmp / n).mkdir(exist_ok=True)
    return replication_module(tmp, c1), c1, c2


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
