"""The node release: what the wheelhouse builder puts in, what it checks, versions that agree."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
COLLECTION = ROOT / "collections/ansible_collections/hapair/cluster"
BUILDER = COLLECTION / "roles/runtime/files/build_wheelhouse.py"


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_wheelhouse", BUILDER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_wheelhouse"] = module
    spec.loader.exec_module(module)
    return module


bw = _builder()


def test_node_wheel_sources_hold_the_runtime_only() -> None:
    files = [p.relative_to(ROOT).as_posix() for p in bw.project_files(ROOT)]
    assert "src/ha_runtime/cli.py" in files and "LICENSE" in files
    assert not [f for f in files if f.startswith("src/ha_lab")]
    node = tomllib.loads(bw.node_pyproject((ROOT / "pyproject.toml").read_text()))
    assert node["project"]["scripts"] == {"hactl": "ha_runtime.cli:main"}


def test_lock_pins_every_dependency_with_a_hash() -> None:
    lock = ROOT / bw.LOCK
    bw.check_lock(ROOT, lock)  # raises when stale
    text = lock.read_text()
    assert text.count("==") == text.count("--hash=sha256:")


def test_a_stale_lock_is_refused_with_the_difference(tmp_path: Path) -> None:
    lock = tmp_path / "node.lock"
    lock.write_text((ROOT / bw.LOCK).read_text().replace("trio==0.35.0", "trio==0.34.0"))
    with pytest.raises(SystemExit, match=r"trio==0\.35\.0 \(lock: 0\.34\.0\)"):
        bw.check_lock(ROOT, lock)


def test_a_prebuilt_wheelhouse_must_match_its_manifest(tmp_path: Path) -> None:
    (tmp_path / "a-1.0-py3-none-any.whl").write_bytes(b"a")
    (tmp_path / "MANIFEST.sha256").write_text(bw.manifest(tmp_path))
    assert bw.check_prebuilt(tmp_path)
    (tmp_path / "a-1.0-py3-none-any.whl").write_bytes(b"tampered")
    with pytest.raises(SystemExit, match="do not match MANIFEST"):
        bw.check_prebuilt(tmp_path)


def test_node_requirements_from_wheel_tags(tmp_path: Path) -> None:
    for name in (
        "numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        "pyyaml-6.0.3-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        "trio-0.35.0-py3-none-any.whl",
    ):
        (tmp_path / name).write_bytes(b"")
    assert bw.node_requirements(tmp_path) == {"glibc": "2.27", "libfuse3": False}
    (tmp_path / "pyfuse3-3.5.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    needs = bw.node_requirements(tmp_path)
    assert needs["libfuse3"] is True
    assert tuple(map(int, needs["glibc"].split("."))) >= (2, 27)  # this controller's glibc


def test_collection_and_package_versions_agree() -> None:
    package = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    galaxy = yaml.safe_load((COLLECTION / "galaxy.yml").read_text())
    assert galaxy["version"] == package["version"]
    assert galaxy["license"] == [package["license"]]
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_changelog_fragments_use_the_configured_sections() -> None:
    config = yaml.safe_load((COLLECTION / "changelogs/config.yaml").read_text())
    sections = {name for name, _ in config["sections"]} | {"release_summary", "trivial"}
    fragments = sorted((COLLECTION / "changelogs/fragments").glob("*.yml"))
    assert fragments
    for fragment in fragments:
        content = yaml.safe_load(fragment.read_text())
        assert set(content) <= sections, fragment.name
        for entries in content.values():
            assert all(isinstance(e, str) and e for e in entries), fragment.name
