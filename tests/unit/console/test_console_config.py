"""The console section of cluster.yml and the password hashes it holds."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
import yaml

from ha_runtime.config import parse_cluster
from ha_runtime.console.auth import Authenticator, BadHash, User, make_hash, parse_hash

BASE = {
    "node": "node1",
    "nodes": [
        {"name": "node1", "addresses": {"lan": "10.0.0.1"}},
        {"name": "node2", "addresses": {"lan": "10.0.0.2"}},
    ],
    "site_key": "/etc/hapair/site.key",
    "tls": {"ca": "/etc/hapair/ca.crt", "cert": "/etc/hapair/n.crt", "key": "/etc/hapair/n.key"},
}


def _errors(console: object) -> list[str]:
    cfg, errors = parse_cluster({**BASE, "console": console}, Path("/etc/hapair/cluster.yml"))
    assert (cfg is None) == bool(errors)
    return errors


def test_console_section_parsed() -> None:
    h = make_hash("a long enough password", log2n=10)
    text = f"""
address: 10.79.0.11:8443
peers: {{node2: "10.79.0.12:8443"}}
users:
  - {{name: ops, role: operator, password_hash: "{h}"}}
  - {{name: alice, role: viewer, certificate: true}}
"""
    cfg, errors = parse_cluster(
        {**BASE, "console": yaml.safe_load(text)}, Path("/etc/hapair/cluster.yml")
    )
    assert not errors and cfg is not None and cfg.console is not None
    assert cfg.console.address == "10.79.0.11:8443"
    assert cfg.console.peers == {"node2": "10.79.0.12:8443"}
    assert [(u.name, u.role, u.certificate) for u in cfg.console.users] == [
        ("ops", "operator", False),
        ("alice", "viewer", True),
    ]
    no_console, _ = parse_cluster(BASE, Path("/x.yml"))
    assert no_console is not None and no_console.console is None


def test_console_section_errors_name_the_field() -> None:
    errors = _errors(
        {
            "address": "nowhere",
            "peers": {"node9": "10.0.0.9:1"},
            "users": [
                {"name": "ops", "role": "admin", "password_hash": "md5$abc"},
                {"name": "bob", "role": "viewer"},
                {"name": "bob", "role": "viewer", "certificate": "yes"},
            ],
            "colour": "red",
        }
    )
    text = "\n".join(errors)
    assert "console.address: expected HOST:PORT like 10.79.0.11:8443, got 'nowhere'" in text
    assert "console.peers.node9: expected another node (node2)" in text
    assert "console.users[0].role: expected one of viewer, operator, got 'admin'" in text
    assert "console.users[0].password_hash: expected scrypt$LOG2N$R$P$SALT$HASH" in text
    assert "md5$abc" not in text  # the hash itself is never echoed
    assert "console.users[1]: expected password_hash, certificate: true, or both" in text
    assert "console.users[2].certificate: expected true or false, got 'yes'" in text
    assert "console.colour: unknown field" in text
    empty = "\n".join(_errors({"address": "1.2.3.4:5", "users": []}))
    assert "console.users: expected a non-empty list" in empty


def test_password_hashes_verify() -> None:
    h = make_hash("correct horse battery", log2n=10)
    assert parse_hash(h).verify("correct horse battery")
    assert not parse_hash(h).verify("correct horse batterY")
    salt = b"0123456789abcdef"
    dk = hashlib.pbkdf2_hmac("sha256", b"pw of the operator", salt, 200_000)
    pb = f"pbkdf2_sha256$200000${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"
    assert parse_hash(pb).verify("pw of the operator")
    for bad in ("scrypt$15$8$1$!!$!!", "pbkdf2_sha256$10$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA==",
                "scrypt$x$8$1$a$b", ""):  # fmt: skip
        with pytest.raises(BadHash):
            parse_hash(bad)


def test_sessions_expire_and_follow_the_inventory() -> None:
    now = [0.0]
    users = (User("ops", "operator", make_hash("x" * 12, log2n=10)),)
    auth = Authenticator(users, idle_timeout_s=60, clock=lambda: now[0])
    assert auth.check_password("ops", "x" * 12) is not None
    assert auth.check_password("nobody", "x" * 12) is None
    s = auth.open(users[0], "password")
    now[0] = 59
    assert auth.session(s.token, None) is s
    now[0] = 118.5
    assert auth.session(s.token, None) is s  # idle time counts from the last use
    now[0] = 180
    assert auth.session(s.token, None) is None
    # A role changed in the inventory ends the session.
    s = auth.open(users[0], "password")
    auth.users["ops"] = User("ops", "viewer")
    assert auth.session(s.token, None) is None
