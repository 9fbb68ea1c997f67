"""The status tells which site keys the daemon runs with (fingerprints only, never a key):
what playbooks/rotate_secrets.yml reads to know which node must restart for a phase."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ha_runtime.config import load_site
from ha_runtime.daemon import NodeDaemon
from ha_runtime.security import key_id
from tests.sitefactory import Tls, free_port, module_data, write_site

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "collections"))

from ansible_collections.hapair.cluster.plugins.module_utils import hactl

OLD, NEW = b"o" * 48, b"n" * 48


def test_status_shows_the_fingerprints_of_the_keys_and_the_accepted_count(tmp_path: Path) -> None:
    base = tmp_path / "node1"
    path = write_site(
        base, "node1", heartbeat_port=free_port(), site_key=base / "site.key",
        tls=Tls(base / "ca.crt", base / "node.crt", base / "node.key"), module=module_data(),
    )  # fmt: skip
    daemon = NodeDaemon(load_site(path), NEW, metrics=False, accepted_keys=(OLD,))
    status = daemon.status()
    assert status["site_keys"] == {"current": key_id(NEW), "accepted": [key_id(OLD)]}
    assert status["heartbeat_accepted_key"] == 0
    assert OLD.decode() not in str(status) and NEW.decode() not in str(status)
    # ha_status (the playbook's reader) hands them on; None from a daemon without them.
    parsed = hactl.parse_status(json.dumps({**status, "modules": []}))
    assert parsed["site_keys"] == status["site_keys"]
    assert hactl.parse_status(json.dumps({"node": "node1", "modules": []}))["site_keys"] is None
