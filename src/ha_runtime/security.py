"""Secret files (site key, TLS material) must be root-only; we refuse to run otherwise.

The error says which file and what to fix; the content of a secret is never logged.

A site key rotation (playbooks/rotate_secrets.yml -e rotate_site_key=true) puts a second
key beside `site.key` for a while: `site.key.next` (the key about to become current) or
`site.key.previous` (the one it replaced). Packets and frames are made with `site.key`
only; those made with an accepted key are taken too (`SiteKeys`), so two nodes that
switched at different moments still authenticate each other. The accepted files are
checked like the site key.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ha_runtime.config import ClusterConfig

MIN_KEY_BYTES = 32


class InsecureFile(Exception):
    pass


def check_private(path: Path, what: str) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InsecureFile(f"{what} {path} does not exist") from None
    except PermissionError:
        raise InsecureFile(f"{what} {path} is not readable by this process") from None
    if not stat.S_ISREG(st.st_mode):
        raise InsecureFile(f"{what} {path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise InsecureFile(
            f"{what} {path} is owned by uid {st.st_uid}, expected uid {os.geteuid()} (root):"
            f" chown root:root {path}"
        )
    if st.st_mode & 0o077:
        raise InsecureFile(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable beyond its owner:"
            f" chmod 0600 {path}"
        )


def check_secrets(cluster: ClusterConfig) -> None:
    """All secret files of the node file, each checked; every problem reported."""
    problems: list[str] = []
    for path, what in (
        (cluster.site_key, "site key"),
        *((p, "accepted site key") for p in accepted_key_paths(cluster.site_key) if p.exists()),
        (cluster.tls.key, "TLS key"),
        (cluster.tls.cert, "TLS certificate"),
        (cluster.tls.ca, "TLS CA certificate"),
    ):
        try:
            check_private(path, what)
        except InsecureFile as exc:
            problems.append(str(exc))
    if problems:
        raise InsecureFile("refusing to start: " + "; ".join(problems))


def read_site_key(path: Path, what: str = "site key") -> bytes:
    check_private(path, what)
    key = path.read_bytes().rstrip(b"\r\n")
    if len(key) < MIN_KEY_BYTES:
        raise InsecureFile(f"{what} {path} is too short: expected at least {MIN_KEY_BYTES} bytes")
    return key


# Beside site.key during a rotation: the key to come (phase 1), then the one replaced (2).
ACCEPTED_SUFFIXES = (".next", ".previous")


def accepted_key_paths(site_key: Path) -> tuple[Path, ...]:
    return tuple(site_key.with_name(site_key.name + s) for s in ACCEPTED_SUFFIXES)


def key_id(key: bytes) -> str:
    """A short fingerprint of a key (SHA-256, 16 hex digits): what status shows and what
    the rotation playbook compares (`lookup('file', ...) | hash('sha256')`), never the key."""
    return hashlib.sha256(key).hexdigest()[:16]


@dataclass(frozen=True)
class SiteKeys:
    """The site key packets and frames are made with, and the others a rotation accepts."""

    current: bytes = field(repr=False)
    accepted: tuple[bytes, ...] = field(default=(), repr=False)

    def ids(self) -> dict[str, object]:
        return {"current": key_id(self.current), "accepted": [key_id(k) for k in self.accepted]}


def read_accepted_keys(site_key: Path, current: bytes) -> tuple[bytes, ...]:
    """The accepted keys present beside `site_key`, checked, without `current` or repeats
    (a rotation interrupted between its steps may leave a copy of the current key)."""
    out: list[bytes] = []
    for path in accepted_key_paths(site_key):
        if path.exists():
            key = read_site_key(path, "accepted site key")
            if key != current and key not in out:
                out.append(key)
    return tuple(out)


def read_site_keys(path: Path) -> SiteKeys:
    current = read_site_key(path)
    return SiteKeys(current, read_accepted_keys(path, current))
