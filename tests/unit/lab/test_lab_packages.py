"""ha_lab.packages: the cache key, apt's private state and dpkg's states (no download)."""

from __future__ import annotations

from pathlib import Path

from ha_lab import packages, rootfs
from ha_lab.packages import GLUSTERFS, PackageSet


def test_key_follows_the_package_list_and_the_image() -> None:
    key = packages.cache_key(GLUSTERFS, "image-a")
    reordered = PackageSet("glusterfs", ("glusterfs-client", "glusterfs-server"))
    assert key == packages.cache_key(reordered, "image-a")
    assert key != packages.cache_key(GLUSTERFS, "image-b")
    assert key != packages.cache_key(PackageSet("glusterfs", ("glusterfs-server",)), "image-a")
    directory = packages.cache_dir(GLUSTERFS)
    assert directory.parent == packages.DEBS_DIR and directory.name.startswith("glusterfs-")
    assert directory.name.endswith(packages.cache_key(GLUSTERFS, rootfs.cache_key()))


def test_apt_state_stays_in_the_staging_directory(tmp_path: Path) -> None:
    opts = packages.apt_options(tmp_path)
    assert opts[::2] == ["-o"] * (len(opts) // 2)
    settings = dict(o.split("=", 1) for o in opts[1::2])
    for name in ("Dir::Etc::SourceList", "Dir::Etc::SourceParts", "Dir::State",
                 "Dir::State::Lists", "Dir::State::status", "Dir::Cache",
                 "Dir::Cache::archives", "Dir::Etc::PreferencesParts"):  # fmt: skip
        assert Path(settings[name]).is_relative_to(tmp_path), name
    assert settings["APT::Install-Recommends"] == "false"
    line = packages.sources_line(Path("/img/usr/share/keyrings/debian-archive-keyring.gpg"))
    assert line == (
        "deb [signed-by=/img/usr/share/keyrings/debian-archive-keyring.gpg] "
        f"{rootfs.MIRROR} {rootfs.SUITE} main\n"
    )


def test_dpkg_states() -> None:
    out = "glusterfs-server ii \nattr rc \nlibaio1 iU \nxfsprogs un \nbroken\n"
    states = packages.parse_status(out)
    assert states == {"glusterfs-server": "ii", "attr": "rc", "libaio1": "iU", "xfsprogs": "un"}
    assert packages.installed(states) == {"glusterfs-server"}
    # Anything that left files behind is purged; a name dpkg only remembers is not.
    assert packages.present(states) == {"glusterfs-server", "attr", "libaio1"}


def test_manifest_round_trip(tmp_path: Path) -> None:
    (tmp_path / packages.MANIFEST).write_text(
        '{"set": {}, "debs": [{"file": "a_1_all.deb", "package": "a", "version": "1"}]}'
    )
    assert packages.read_manifest(tmp_path) == [packages.Deb("a_1_all.deb", "a", "1")]
