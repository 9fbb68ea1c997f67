"""The consoles' two-node site (tests/sitefactory.py) with real TLS files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.sitefactory import (
    Tls,
    module_data,
    prim_scripts,
    write_key,
    write_scripts,
    write_site,
)

from .pki import make_ca, make_cert


def pair_site(tmp: Path, node: str, port: int, *, replicated: int = 0, console: str = "") -> Path:
    """cluster.yml of `node` (and its module file); `console` is the YAML of the optional
    console section, indented as a top-level key; `replicated`: the replication port of a
    replicated directory (0: none)."""
    pki = tmp / "pki"
    if not (pki / "ca.crt").exists():
        ca = make_ca(pki)
        for n in ("node1", "node2"):
            make_cert(pki, ca, n)
    base = tmp / node
    scripts = write_scripts(base, "exit 0")
    extra: dict[str, Any] = {}
    if replicated:
        extra = {
            "replicated_dirs": [base / "app"],
            "replication": {"port": replicated, "timeout_ms": 1000, "networks": ["lan"]},
        }
    alive = {"name": "alive", "type": "command", "command": "/bin/true", "interval_s": 0.2}
    module = module_data(
        scripts=prim_scripts(scripts), checkers=[alive | {"action": "wait"}], **extra
    )
    return write_site(
        base, node, heartbeat_port=port, site_key=write_key(base / "site.key", b"m" * 48),
        tls=Tls.of(pki, node), module=module, **(yaml.safe_load(console) or {}),
    )  # fmt: skip
