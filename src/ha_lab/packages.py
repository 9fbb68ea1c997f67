"""Extra Debian packages for the nodes, downloaded once on the host, installed offline.

The rootfs image carries what a hapair node needs. A benchmark that sets up another system
beside hapair (GlusterFS) needs more, but must not change the shared image (a new cache key
is a rebuild for every user of the lab). So a package set is resolved against the image's
own dpkg database: `apt-get install --download-only` on the host, with a private apt state
(its own sources list, lists and a copy of the image's status file), downloads exactly the
.debs a node built from that image lacks into CACHE_DIR/debs/<set>-<key>/. Installing copies
them into the node and runs `dpkg --install` there: no network inside the lab, and no
network at all once cached. The key covers the suite, mirror, package names and the image's
own key, so a new image gets its own set.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from . import rootfs
from .node import Node
from .system import LabError, run
from .topology import CACHE_DIR

DEBS_DIR = CACHE_DIR / "debs"
# Bump when the way a set is resolved changes: it is part of the cache key.
RECIPE_VERSION = 1
MANIFEST = "manifest.json"
# Where the .debs are copied inside a node while dpkg installs them (removed after).
NODE_STAGING = "/var/tmp/ha-lab-debs"


@dataclass(frozen=True)
class PackageSet:
    name: str
    packages: tuple[str, ...]


# Debian 12's GlusterFS 10.3: the daemon and bricks, and the FUSE client (mount.glusterfs).
GLUSTERFS = PackageSet("glusterfs", ("glusterfs-server", "glusterfs-client"))


@dataclass(frozen=True)
class Deb:
    file: str
    package: str
    version: str


def cache_key(pset: PackageSet, image_key: str) -> str:
    recipe = {
        "suite": rootfs.SUITE,
        "mirror": rootfs.MIRROR,
        "packages": sorted(pset.packages),
        "image": image_key,
        "v": RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(pset: PackageSet) -> Path:
    return DEBS_DIR / f"{pset.name}-{cache_key(pset, rootfs.cache_key())}"


def apt_options(staging: Path) -> list[str]:
    """apt-get options that keep every piece of apt state under ``staging``: the host's
    own sources, lists, preferences and dpkg database are neither used nor touched."""
    return [
        "-o", f"Dir::Etc::SourceList={staging / 'sources.list'}",
        "-o", f"Dir::Etc::SourceParts={staging / 'sources.list.d'}",
        "-o", f"Dir::Etc::PreferencesParts={staging / 'preferences.d'}",
        "-o", f"Dir::State={staging / 'state'}",
        "-o", f"Dir::State::Lists={staging / 'lists'}",
        # A copy of the image's database: apt locks the directory that holds it, and the
        # shared image must not be written to.
        "-o", f"Dir::State::status={staging / 'status'}",
        "-o", f"Dir::Cache={staging / 'cache'}",
        "-o", f"Dir::Cache::archives={staging / 'archives'}",
        "-o", "APT::Install-Recommends=false",
        # The files are root's own temporary tree; the _apt sandbox user cannot write there.
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip


def sources_line(keyring: Path) -> str:
    return f"deb [signed-by={keyring}] {rootfs.MIRROR} {rootfs.SUITE} main\n"


def read_manifest(directory: Path) -> list[Deb]:
    data = json.loads((directory / MANIFEST).read_text())
    return [Deb(**entry) for entry in data["debs"]]


def ensure_debs(pset: PackageSet) -> tuple[Path, list[Deb]]:
    """The set's cached .debs (downloading them first when missing) and their manifest."""
    target = cache_dir(pset)
    if (target / MANIFEST).exists():
        return target, read_manifest(target)
    image = rootfs.image_dir()
    if not (image / ".ha-lab-complete").exists():
        raise LabError(f"{image}: no node image yet (run `ha-lab up` first)")
    keyring = image / "usr/share/keyrings/debian-archive-keyring.gpg"
    if not keyring.exists():
        raise LabError(f"{keyring}: the image has no Debian archive keyring")
    staging = target.with_suffix(".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for sub in ("sources.list.d", "preferences.d", "state", "lists/partial", "cache",
                "archives/partial"):  # fmt: skip
        (staging / sub).mkdir(parents=True)
    (staging / "sources.list").write_text(sources_line(keyring))
    shutil.copyfile(image / "var/lib/dpkg/status", staging / "status")
    apt = ["apt-get", "-q", *apt_options(staging)]
    run([*apt, "update"], timeout=900)
    run([*apt, "install", "--download-only", "-y", *pset.packages], timeout=1800)
    debs = []
    for path in sorted((staging / "archives").glob("*.deb")):
        fields = run(["dpkg-deb", "--showformat=${Package}\\t${Version}", "--show", str(path)])
        package, version = fields.stdout.strip().split("\t")
        debs.append(Deb(path.name, package, version))
    if not {d.package for d in debs} >= set(pset.packages):
        raise LabError(f"apt-get downloaded {[d.package for d in debs]}, not {pset.packages}")
    result = staging / "result"
    result.mkdir()
    for deb in debs:
        (staging / "archives" / deb.file).rename(result / deb.file)
    manifest = {"set": asdict(pset), "debs": [asdict(d) for d in debs]}
    (result / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    result.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target, debs


def parse_status(dpkg_query_output: str) -> dict[str, str]:
    """Package -> two-letter state (wanted, current) from
    `dpkg-query -W -f '${Package} ${db:Status-Abbrev}\\n'`: "ii" installed, "rc" removed
    with its configuration left, "iU"/"iF" half done; names dpkg does not know are absent."""
    states = {}
    for line in dpkg_query_output.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1][:2]
    return states


def present(states: dict[str, str]) -> set[str]:
    """Names that left anything on the node: any state but "not installed" (un, pn)."""
    return {name for name, state in states.items() if state[1:2] not in ("n", "")}


def installed(states: dict[str, str]) -> set[str]:
    return {name for name, state in states.items() if state[1:2] == "i"}


def status(node: Node, names: Iterable[str]) -> dict[str, str]:
    """dpkg's state of each of ``names`` on the node (see parse_status)."""
    fmt = "${Package} ${db:Status-Abbrev}\\n"
    # Exit 1 when some name is unknown to dpkg: expected, the others are still listed.
    proc = run(node.exec_command(["dpkg-query", "-W", "-f", fmt, *names]), check=False)
    return parse_status(proc.stdout)


def install(node: Node, pset: PackageSet) -> list[str]:
    """Install the set into the running node from the host's cache, without any network.
    Returns the packages this installed (those the node lacked), for `purge`."""
    directory, debs = ensure_debs(pset)
    have = installed(status(node, [d.package for d in debs]))
    wanted = [d for d in debs if d.package not in have]
    if not wanted:
        return []
    inner = f"{NODE_STAGING}-{pset.name}"
    on_host = node.paths.root / inner.lstrip("/")
    shutil.rmtree(on_host, ignore_errors=True)
    on_host.mkdir(parents=True)
    try:
        for deb in wanted:
            shutil.copyfile(directory / deb.file, on_host / deb.file)
        files = [f"{inner}/{deb.file}" for deb in wanted]
        # One dpkg call for the whole set: it unpacks all, then configures in dependency order.
        run(node.exec_command(_noninteractive(["dpkg", "--install", *files])), timeout=900)
    finally:
        shutil.rmtree(on_host, ignore_errors=True)
    return [d.package for d in wanted]


def purge(node: Node, packages: Sequence[str]) -> None:
    """Remove packages `install` put on the node, configuration and all."""
    if packages:
        run(node.exec_command(_noninteractive(["dpkg", "--purge", *packages])), timeout=900)


def _noninteractive(argv: list[str]) -> list[str]:
    return ["env", "DEBIAN_FRONTEND=noninteractive", *argv]
