"""The nodes' Debian 12 root file system, built once with debootstrap and cached.

The cache directory's name carries a key of everything that shapes the image (suite,
mirror, package list, post-install steps), so changing the list builds a new image
instead of silently reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .system import LabError, run, unmount_all
from .topology import CACHE_DIR

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What a hapair node needs: sites are air-gapped, so the image carries every OS package
# the prerequisites role expects (it checks them, it cannot download them).
PACKAGES = (
    "ca-certificates",
    "curl",
    "dbus",
    "e2fsprogs",
    "fuse3",
    "iproute2",
    "iputils-ping",
    "kmod",
    "less",
    "libfuse3-3",
    "nftables",
    "openssh-server",
    "procps",
    "psmisc",
    "python3",
    "python3-apt",
    "python3-venv",
    "rsync",
    "sqlite3",
    "systemd",
    "systemd-sysv",
)
# Bump when the post-install steps below change: it is part of the cache key.
RECIPE_VERSION = 1
# Timers that would try to reach the internet or churn the disk in the middle of a test.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer")


def cache_key() -> str:
    recipe = {"suite": SUITE, "mirror": MIRROR, "packages": sorted(PACKAGES), "v": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def image_dir() -> Path:
    return CACHE_DIR / f"rootfs-{cache_key()}"


def ensure_image() -> Path:
    """Return the cached image, building it first when missing (about a minute)."""
    target = image_dir()
    if (target / ".ha-lab-complete").exists():
        return target
    staging = target.with_suffix(".tmp")
    # A build killed halfway leaves proc/sys mounts and a partial tree: start clean.
    unmount_all(staging)
    shutil.rmtree(staging, ignore_errors=True)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(staging),
            MIRROR,
        ],
        timeout=1800,
    )
    _post_install(staging)
    (staging / ".ha-lab-complete").write_text(cache_key() + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _post_install(root: Path) -> None:
    # Per-node identity is written into each node's overlay, never shared through the image.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/hostname").write_text("localhost\n")
    (root / "etc/machine-id").write_text("")
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # No DNS in the lab: do not let sshd stall on reverse lookups of the controller.
    (root / "etc/ssh/sshd_config.d/ha-lab.conf").write_text(
        "UseDNS no\nPermitRootLogin prohibit-password\n"
    )
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("# ha-lab: no DNS, nothing is routed off the machine\n")
    if not (root / "usr/sbin/sshd").exists():
        raise LabError(f"{root}: debootstrap finished without openssh-server")
