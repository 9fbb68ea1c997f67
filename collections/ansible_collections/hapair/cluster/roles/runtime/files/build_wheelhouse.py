#!/usr/bin/env python3
"""Build (once) the offline wheelhouse of the hapair runtime on the controller.

The wheelhouse holds a wheel of the node runtime (package ha_runtime only: the lab,
ha_lab and its ha-lab command, stay on the controller) and of every runtime dependency,
plus pip itself so that nodes can install with no index and no ensurepip (air-gapped
sites). Dependencies come from the hashed lock (requirements/node.lock, pip
--require-hashes), so every build fetches the very same files; --write-lock makes the
lock again from pyproject.toml's pins. It lives in CACHE/<version>-<fingerprint>/, where
the fingerprint covers the node's sources, the lock and the Python that builds it: an
unchanged project reuses the wheelhouse and nodes see exactly the same files, so they do
not reinstall. --prebuilt DIR takes a wheelhouse built elsewhere (a controller with no
registry access) after checking every wheel against its MANIFEST.sha256.

Prints one JSON object: id, path, version, pip_wheel, manifest_sha256, changed, built
(false with --dry-run when the wheelhouse would have to be built).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", "build", "dist"}
NODE_PACKAGE = "ha_runtime"
LOCK = Path("requirements/node.lock")
GLIBC_TAG = re.compile(r"^manylinux_(\d+)_(\d+)_")
# The controller-only command of the lab, left out of the node's wheel.
LAB_SCRIPT = re.compile(r"^ha-lab\s*=.*\n", re.MULTILINE)


def project_files(project: Path) -> list[Path]:
    """What the node's wheel is built from (and what its fingerprint covers)."""
    files = [
        project / name
        for name in ("pyproject.toml", "README.md", "LICENSE")
        if (project / name).is_file()
    ]
    for root, dirs, names in os.walk(project / "src" / NODE_PACKAGE):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        files.extend(Path(root) / n for n in sorted(names) if not n.endswith((".pyc", ".pyo")))
    return files


def node_pyproject(text: str) -> str:
    """pyproject.toml of the node's wheel: the same, without the lab's command."""
    node = LAB_SCRIPT.sub("", text)
    if "ha-lab" in tomllib.loads(node)["project"].get("scripts", {}):
        raise SystemExit("pyproject.toml: cannot leave the ha-lab script out of the node wheel")
    return node


def fingerprint(project: Path, lock: Path | None) -> str:
    digest = hashlib.sha256()
    digest.update(f"{sys.version_info[:2]}|{platform.machine()}|{sys.platform}".encode())
    for path in [*project_files(project), *([lock] if lock else [])]:
        digest.update(
            path.name.encode() if path == lock else str(path.relative_to(project)).encode()
        )
        digest.update(b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def manifest(directory: Path) -> str:
    lines = []
    for wheel in sorted(directory.glob("*.whl")):
        lines.append(f"{hashlib.sha256(wheel.read_bytes()).hexdigest()}  {wheel.name}\n")
    return "".join(lines)


def lock_pins(lock: Path) -> dict[str, str]:
    """name -> version of every requirement of a lock (names normalised)."""
    pins = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if match:
            pins[normalise(match.group(1))] = match.group(2)
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_lock(project: Path, lock: Path) -> None:
    """The lock must pin every runtime dependency of pyproject.toml at its version."""
    if not lock.is_file():
        raise SystemExit(f"{lock}: no lock; make it with: {Path(__file__).name} --write-lock")
    pins = lock_pins(lock)
    stale = []
    for req in tomllib.loads((project / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, version = req.partition("==")
        if pins.get(normalise(name.strip())) != version.strip():
            stale.append(f"{req} (lock: {pins.get(normalise(name.strip()), 'missing')})")
    if stale or "pip" not in pins:
        raise SystemExit(
            f"{lock} does not match pyproject.toml: {', '.join(stale) or 'pip missing'};"
            f" make it again with: {Path(__file__).name} --write-lock"
        )


def write_lock(project: Path, lock: Path, python: str) -> None:
    """Download pyproject.toml's pins and their dependencies; write them with their hashes."""
    deps = tomllib.loads((project / "pyproject.toml").read_text())["project"]["dependencies"]
    with tempfile.TemporaryDirectory(prefix="hapair-lock-") as tmp:
        cmd = [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
        cmd += ["--dest", tmp, *deps, "pip"]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        entries = []
        for artefact in sorted(Path(tmp).iterdir()):
            match = re.match(r"^(.+?)-([0-9][^-]*?)(?:\.tar\.gz|\.zip|-.*\.whl)$", artefact.name)
            if not match:
                raise SystemExit(f"cannot read name and version of {artefact.name}")
            digest = hashlib.sha256(artefact.read_bytes()).hexdigest()
            entries.append(
                f"{normalise(match.group(1))}=={match.group(2)} \\\n    --hash=sha256:{digest}\n"
            )
    lock.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# The node wheelhouse's dependencies, pinned with the hashes of the files PyPI serves.\n"
        f"# Made by: {Path(__file__).name} --write-lock (from pyproject.toml's dependencies);\n"
        "# used with pip --require-hashes. Do not edit by hand.\n"
    )
    lock.write_text(header + "".join(sorted(entries)))


def build(project: Path, target: Path, python: str, lock: Path) -> None:
    """Build into a temporary directory next to target, then rename (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        source = Path(tmp) / "source"
        source.mkdir()
        # Build from a copy so the repository gets no build/ or egg-info droppings.
        for path in project_files(project):
            dest = source / path.relative_to(project)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        (source / "pyproject.toml").write_text(
            node_pyproject((project / "pyproject.toml").read_text())
        )
        wheels = Path(tmp) / "wheels"
        pip = [python, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"]
        pip += ["--wheel-dir", str(wheels)]
        # Dependencies: exactly the locked files. The project: its own wheel, no dependency.
        subprocess.run([*pip, "--require-hashes", "-r", str(lock)], check=True, stdout=sys.stderr)
        subprocess.run([*pip, "--no-deps", str(source)], check=True, stdout=sys.stderr)
        (wheels / "MANIFEST.sha256").write_text(manifest(wheels))
        wheels.rename(target)


def prune(cache: Path, keep: int) -> None:
    """Keep the `keep` most recently built wheelhouses of the cache."""
    built = sorted(
        (p for p in cache.iterdir() if p.is_dir() and (p / "MANIFEST.sha256").is_file()),
        key=lambda p: (p / "MANIFEST.sha256").stat().st_mtime,
        reverse=True,
    )
    for old in built[keep:]:
        shutil.rmtree(old)


def check_prebuilt(directory: Path) -> str:
    """A wheelhouse built elsewhere: every wheel listed with its hash, and no other."""
    listing = directory / "MANIFEST.sha256"
    if not listing.is_file():
        raise SystemExit(f"{directory}: not a wheelhouse (no MANIFEST.sha256)")
    text = listing.read_text()
    if text != manifest(directory):
        raise SystemExit(
            f"{directory}: the wheels do not match MANIFEST.sha256 (changed, missing or extra)"
        )
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True, type=Path)
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--keep", type=int, default=3, help="wheelhouses kept in the cache")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="only tell whether a build is needed (Ansible check mode): nothing is built",
    )
    parser.add_argument("--lock", type=Path, default=None, help=f"default: PROJECT/{LOCK}")
    parser.add_argument(
        "--write-lock", action="store_true", help="make the lock from pyproject.toml and exit"
    )
    parser.add_argument(
        "--prebuilt", type=Path, default=None, help="use this wheelhouse, built elsewhere"
    )
    args = parser.parse_args()
    project = args.project.resolve()
    lock = (args.lock or project / LOCK).resolve()
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    if args.write_lock:
        write_lock(project, lock, args.python)
        print(json.dumps({"lock": str(lock), "changed": True}))
        return 0
    if args.prebuilt:
        prebuilt = args.prebuilt.expanduser().resolve()
        text = check_prebuilt(prebuilt)
        ident = f"{meta['version']}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        return _report(ident, prebuilt, meta, changed=False)
    check_lock(project, lock)
    ident = f"{meta['version']}-{fingerprint(project, lock)}"
    target = args.cache.expanduser().resolve() / ident
    changed = not (target / "MANIFEST.sha256").is_file()
    result = {"id": ident, "path": str(target), "name": meta["name"], "version": meta["version"]}
    if changed and args.dry_run:
        result.update(changed=True, manifest_sha256="", pip_wheel="", built=False, needs={})
        print(json.dumps(result))
        return 0
    if changed:
        build(project, target, args.python, lock)
        prune(target.parent, max(1, args.keep))
    return _report(ident, target, meta, changed)


def node_requirements(directory: Path) -> dict[str, Any]:
    """What a node needs to run these wheels: the newest glibc one of them was built for
    (manylinux_X_Y tags: the oldest a wheel accepts; wheels compiled here (linux_*): this
    controller's glibc), and libfuse3 when pyfuse3 is in."""
    needed = (0, 0)
    for wheel in directory.glob("*.whl"):
        platforms = wheel.stem.split("-")[-1].split(".")
        if all(p in ("any",) for p in platforms):
            continue
        tags = [tuple(int(x) for x in m.groups()) for p in platforms if (m := GLIBC_TAG.match(p))]
        if any(p == "manylinux2014_x86_64" for p in platforms):
            tags.append((2, 17))
        if tags:
            needed = max(needed, min(tags))
        elif any(p.startswith("linux_") for p in platforms):
            version = platform.libc_ver()[1]
            needed = max(needed, tuple(int(x) for x in version.split(".")[:2]))
    return {
        "glibc": ".".join(map(str, needed)) if needed != (0, 0) else "",
        "libfuse3": any(directory.glob("pyfuse3-*.whl")),
    }


def _report(ident: str, target: Path, meta: dict[str, Any], changed: bool) -> int:
    result = {"id": ident, "path": str(target), "name": meta["name"], "version": meta["version"]}
    text = (target / "MANIFEST.sha256").read_text()
    pip_wheels = sorted(p.name for p in target.glob("pip-*.whl"))
    if not pip_wheels:
        raise SystemExit(f"{target}: no pip wheel in the wheelhouse")
    result.update(
        built=True,
        changed=changed,
        manifest_sha256=hashlib.sha256(text.encode()).hexdigest(),
        pip_wheel=pip_wheels[-1],
        needs=node_requirements(target),
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
