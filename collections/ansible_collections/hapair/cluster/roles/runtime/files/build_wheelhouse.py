#!/usr/bin/env python3
"""Build (once) the offline wheelhouse of the hapair runtime on the controller.

The wheelhouse holds a wheel of the project and of every runtime dependency, plus pip
itself so that nodes can install with no index and no ensurepip (air-gapped sites).
It lives in CACHE/<version>-<fingerprint>/, where the fingerprint covers the project's
sources and the Python that builds it: an unchanged project reuses the wheelhouse and
nodes see exactly the same files, so they do not reinstall.

Prints one JSON object: id, path, version, pip_wheel, manifest_sha256, changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", "build", "dist"}


def project_files(project: Path) -> list[Path]:
    files = [
        project / name for name in ("pyproject.toml", "README.md") if (project / name).is_file()
    ]
    for root, dirs, names in os.walk(project / "src"):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        files.extend(Path(root) / n for n in sorted(names) if not n.endswith((".pyc", ".pyo")))
    return files


def fingerprint(project: Path) -> str:
    digest = hashlib.sha256()
    digest.update(f"{sys.version_info[:2]}|{platform.machine()}|{sys.platform}".encode())
    for path in project_files(project):
        digest.update(str(path.relative_to(project)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def manifest(directory: Path) -> str:
    lines = []
    for wheel in sorted(directory.glob("*.whl")):
        lines.append(f"{hashlib.sha256(wheel.read_bytes()).hexdigest()}  {wheel.name}\n")
    return "".join(lines)


def build(project: Path, target: Path, python: str) -> None:
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
        wheels = Path(tmp) / "wheels"
        cmd = [python, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"]
        cmd += ["--wheel-dir", str(wheels), str(source), "pip"]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True, type=Path)
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--keep", type=int, default=3, help="wheelhouses kept in the cache")
    args = parser.parse_args()
    project = args.project.resolve()
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    ident = f"{meta['version']}-{fingerprint(project)}"
    target = args.cache.expanduser().resolve() / ident
    changed = not (target / "MANIFEST.sha256").is_file()
    result = {"id": ident, "path": str(target), "name": meta["name"], "version": meta["version"]}
    if changed:
        build(project, target, args.python)
        prune(target.parent, max(1, args.keep))
    text = (target / "MANIFEST.sha256").read_text()
    pip_wheels = sorted(p.name for p in target.glob("pip-*.whl"))
    if not pip_wheels:
        raise SystemExit(f"{target}: no pip wheel in the wheelhouse")
    result.update(
        changed=changed,
        manifest_sha256=hashlib.sha256(text.encode()).hexdigest(),
        pip_wheel=pip_wheels[-1],
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
