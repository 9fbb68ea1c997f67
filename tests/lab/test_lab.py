"""The lab behaves like two real servers on three networks, and breaks like them."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from labcmd import in_node, ping

from ha_lab import topology
from ha_lab.lab import Lab
from ha_lab.node import Node

HB = {"node1": "10.78.0.11", "node2": "10.78.0.12"}
LAN = {"node1": "10.77.0.11", "node2": "10.77.0.12"}
MGMT = {"node1": "10.79.0.11", "node2": "10.79.0.12"}


def test_both_nodes_answer_ssh_on_mgmt(lab: Lab) -> None:
    for name in ("node1", "node2"):
        proc = subprocess.run(
            Node(name).ssh_command(["hostname"]),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == name


def test_nodes_run_systemd_as_pid1_with_fuse(lab: Lab) -> None:
    for name in ("node1", "node2"):
        assert in_node(lab, name, "cat", "/proc/1/comm").stdout.strip() == "systemd"
        assert in_node(lab, name, "test", "-c", "/dev/fuse").returncode == 0


def test_nodes_tune_their_own_network_sysctls_only(lab: Lab) -> None:
    # A server sets ip_nonlocal_bind for its VIPs; the host's kernel settings stay out of reach.
    ok = in_node(lab, "node1", "sysctl", "-w", "net.ipv4.ip_nonlocal_bind=1")
    assert ok.returncode == 0, ok.stderr
    denied = in_node(lab, "node1", "sh", "-c", "echo 1 > /proc/sys/kernel/sysrq")
    assert denied.returncode != 0


def test_nodes_reach_each_other_on_hb_and_lan(lab: Lab) -> None:
    assert ping(lab, "node1", HB["node2"])
    assert ping(lab, "node2", HB["node1"])
    assert ping(lab, "node1", LAN["node2"])


def test_client_and_witness_sit_on_lan_only(lab: Lab) -> None:
    client = subprocess.run(lab.client_argv(["ping", "-c1", "-W1", LAN["node1"]]), check=False)
    assert client.returncode == 0
    # Nothing is routed: the client cannot reach the heartbeat link.
    blocked = subprocess.run(
        lab.client_argv(["ping", "-c1", "-W1", HB["node1"]]), capture_output=True, check=False
    )
    assert blocked.returncode != 0
    assert ping(lab, "node1", "10.77.0.1")  # the witness, the site's router


def test_inventory_lists_the_nodes(lab: Lab) -> None:
    text = Path(lab.describe()["inventory"]).read_text()
    for name, address in MGMT.items():
        assert name in text and address in text
    assert str(topology.SSH_KEY) in text


def test_cut_hb_breaks_only_hb(lab: Lab) -> None:
    lab.cut("node1", "hb")
    try:
        assert not ping(lab, "node2", HB["node1"])
        assert ping(lab, "node2", LAN["node1"])
        assert subprocess.run(Node("node1").ssh_command(["true"]), check=False).returncode == 0
        assert lab.describe()["nodes"][0]["faults"] == ["cut hb"]
    finally:
        lab.restore("node1")
    assert ping(lab, "node2", HB["node1"])


def test_loss_100_drops_everything_and_restore_heals(lab: Lab) -> None:
    lab.loss("node2", 100)
    try:
        for net in (HB, LAN, MGMT):
            assert not ping(lab, "node1", net["node2"])
    finally:
        lab.restore("node2")
    assert ping(lab, "node1", HB["node2"], count=2)


def test_loss_30_drops_some_not_all(lab: Lab) -> None:
    lab.loss("node2", 30, "hb")
    try:
        proc = in_node(lab, "node1", "ping", "-n", "-q", "-c", "100", "-i", "0.01", "-W", "1",
                       HB["node2"])  # fmt: skip
        received = int(proc.stdout.split(" received")[0].rsplit(",", 1)[1])
        # Two directions at 30% each: about 49% of round trips survive.
        assert 15 <= received <= 85, proc.stdout
    finally:
        lab.restore("node2")


def test_fill_fills_the_node_disk_only(lab: Lab) -> None:
    filler = lab.fill("node2", "/var/tmp")
    try:
        full = in_node(lab, "node2", "sh", "-c", "head -c 1048576 /dev/zero > /var/tmp/more")
        assert full.returncode != 0 and "No space left" in full.stderr
        assert in_node(lab, "node1", "sh", "-c", "echo ok > /var/tmp/ok").returncode == 0
    finally:
        in_node(lab, "node2", "rm", "-f", filler, f"{filler}.tail", "/var/tmp/more")


def test_node_disks_write_to_the_host_disk_directly(lab: Lab) -> None:
    """Each node's loop device uses direct I/O: buffered, every byte a node wrote was
    copied again into the host's page cache by the loop worker, on the CPUs the nodes share,
    and the replication benchmark fell into a mode twice as slow at random."""
    for name in ("node1", "node2"):
        image = str(Node(name).paths.disk_image)
        listed = subprocess.run(
            ["losetup", "--noheadings", "--output", "NAME,DIO", "-j", image],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        assert listed and listed[1::2] == ["1"] * (len(listed) // 2), (name, listed)


def test_crash_vanishes_and_boot_keeps_the_disk(lab: Lab) -> None:
    assert (
        in_node(lab, "node2", "sh", "-c", "echo kept > /root/before-crash && sync").returncode == 0
    )
    # An address the node added itself (as a VIP would be) must vanish with it.
    in_node(lab, "node2", "ip", "addr", "add", "10.77.0.199/24", "dev", "lan0")
    lab.crash("node2")
    assert not Node("node2").running()
    assert not ping(lab, "node1", MGMT["node2"])
    assert not ping(lab, "node1", HB["node2"])
    assert not ping(lab, "node1", "10.77.0.199")
    assert (
        topology.node_ns("node2")
        not in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout
    )
    started = time.monotonic()
    lab.boot("node2")
    assert time.monotonic() - started < 30
    assert in_node(lab, "node2", "cat", "/root/before-crash").stdout.strip() == "kept"
    # Its network is fresh: the address it had added is gone after the power cut.
    assert "10.77.0.199" not in in_node(lab, "node2", "ip", "-br", "addr").stdout
    assert ping(lab, "node1", HB["node2"])


def test_zz_down_leaves_nothing(lab: Lab) -> None:
    lab.down()
    netns = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    assert topology.PREFIX not in netns
    links = subprocess.run(
        ["ip", "-br", "link"], capture_output=True, text=True, check=False
    ).stdout
    assert topology.PREFIX not in links
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(topology.STATE_DIR) not in mounts
    assert (
        str(topology.STATE_DIR)
        not in subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    )
    assert _lab_processes() == []
    lab.down()  # idempotent


def _lab_processes() -> list[str]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        # A zombie holds nothing; it waits for PID 1 to reap it (this sandbox's init is slow).
        if state != "Z" and ("--machine=halab-" in argv or "/var/lib/ha-lab" in argv):
            found.append(argv)
    return found
