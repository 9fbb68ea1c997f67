"""Acceptance tests of the `default` scenario: what deploy.yml leaves on every lab node.

Molecule runs them with ``--hosts=ansible://hapair_nodes`` against the lab inventory, so
every test runs once per node.
"""

import pytest

PACKAGES = [
    "systemd",
    "openssh-server",
    "python3",
    "python3-venv",
    "python3-apt",
    "iproute2",
    "nftables",
    "iputils-ping",
    "fuse3",
    "libfuse3-3",
    "procps",
    "rsync",
    "sqlite3",
    "ca-certificates",
    "curl",
]

SYSCTLS = {
    "net.ipv4.ip_nonlocal_bind": 1,
    "net.ipv4.conf.all.arp_ignore": 1,
    "net.ipv4.conf.all.arp_announce": 2,
}

SYSCTL_FILE = "/etc/sysctl.d/60-hapair.conf"

DIRECTORIES = {
    "/etc/hapair": 0o750,
    "/etc/hapair/modules": 0o750,
    "/var/lib/hapair": 0o750,
    "/var/log/hapair": 0o750,
}


@pytest.mark.parametrize("name", PACKAGES)
def test_package_installed(host, name):
    assert host.package(name).is_installed, f"{name} is not installed"


@pytest.mark.parametrize(("key", "value"), SYSCTLS.items())
def test_sysctl_applied(host, key, value):
    assert host.sysctl(key) == value


def test_sysctl_file(host):
    conf = host.file(SYSCTL_FILE)
    assert conf.is_file
    assert conf.user == "root"
    assert conf.group == "root"
    assert conf.mode == 0o644
    lines = {line.strip() for line in conf.content_string.splitlines()}
    for key, value in SYSCTLS.items():
        assert f"{key} = {value}" in lines


def test_sysctl_file_applies_cleanly(host):
    # What systemd-sysctl does at boot: the file must load without error.
    result = host.run("sysctl -p %s", SYSCTL_FILE)
    assert result.rc == 0, result.stderr


@pytest.mark.parametrize(("path", "mode"), DIRECTORIES.items())
def test_directory(host, path, mode):
    directory = host.file(path)
    assert directory.is_directory
    assert directory.user == "root"
    assert directory.group == "root"
    assert directory.mode == mode


def test_sshd_running(host):
    sshd = host.service("ssh")
    assert sshd.is_running
    assert sshd.is_enabled
    assert host.socket("tcp://22").is_listening


def test_systemd_is_pid1(host):
    assert host.file("/proc/1/comm").content_string.strip() == "systemd"
