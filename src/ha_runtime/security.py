"""Secret files (site key, TLS material) must be root-only; we refuse to run otherwise.

The error says which file and what to fix; the content of a secret is never logged.
"""

from __future__ import annotations

import os
import stat
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


def read_site_key(path: Path) -> bytes:
    check_private(path, "site key")
    key = path.read_bytes().rstrip(b"\r\n")
    if len(key) < MIN_KEY_BYTES:
        raise InsecureFile(f"site key {path} is too short: expected at least {MIN_KEY_BYTES} bytes")
    return key
