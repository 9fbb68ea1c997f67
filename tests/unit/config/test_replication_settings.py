"""One replication settings type: the module file's `replication:` section is what the
replication service of each directory runs with (docs/replication.md)."""

from __future__ import annotations

from pathlib import Path

from ha_runtime.config import ReplicationSettings, parse_module

MODULE = {
    "name": "flightdata",
    "type": "mirror",
    "nodes": ["node1", "node2"],
    "default_primary": "node1",
    "vip": {"address": "10.77.0.100/24", "interface": "lan0"},
    "scripts": {"start_prim": "/usr/bin/true", "stop_prim": "/usr/bin/true"},
    "replicated_dirs": ["/srv/a", "/srv/b"],
}


def test_section_parses_into_the_settings_the_service_takes() -> None:
    data = {
        **MODULE,
        "replication": {"port": 7500, "ack": "received", "timeout_ms": 1500, "networks": ["hb"]},
    }
    module, errors = parse_module(data, Path("flightdata.yml"), check_files=False)
    assert errors == [] and module is not None
    r = module.replication
    assert r == ReplicationSettings(port=7500, ack="received", timeout_ms=1500, networks=("hb",))
    assert r.timeout_s == 1.5
    # Directory n listens on port + n; everything else is the module's.
    assert [r.for_dir(i).port for i in range(2)] == [7500, 7501]
    assert r.for_dir(1).ack == "received" and r.for_dir(1).networks == ("hb",)
    assert r.backing_base(Path("/var/lib/hapair")) == Path("/var/lib/hapair/replica")


def test_defaults_and_the_key_never_printed() -> None:
    module, errors = parse_module(MODULE, Path("flightdata.yml"), check_files=False)
    assert errors == [] and module is not None
    assert module.replication == ReplicationSettings()
    assert (module.replication.port, module.replication.timeout_s) == (7441, 3.0)
    secret = ReplicationSettings(site_key=b"s3cr3t-site-key-bytes-0123456789")
    assert b"s3cr3t".decode() not in repr(secret)
