"""The lab's naming and addressing rules, checked without building a lab."""

from __future__ import annotations

import pytest

from ha_lab import faults, rootfs, topology
from ha_lab.cli import _parser


def test_node_k_has_dot_1k_on_every_network() -> None:
    for k in range(1, topology.MAX_NODES + 1):
        host = topology.node_host(k)
        assert [net.address(host) for net in topology.NETWORKS] == [
            f"10.79.0.1{k}",
            f"10.77.0.1{k}",
            f"10.78.0.1{k}",
        ]


@pytest.mark.parametrize("bad", ["node0", "node5", "nodeX", "web1", ""])
def test_unknown_node_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"expected node1\.\.node4"):
        topology.node_index(bad)


def test_interface_names_fit_the_kernel_limit_and_macs_are_unique() -> None:
    macs = set()
    for k in range(1, topology.MAX_NODES + 1):
        for net in topology.NETWORKS:
            assert len(topology.port_ifname(topology.node_name(k), net)) <= 15
            macs.add(topology.node_mac(k, net))
    assert len(macs) == topology.MAX_NODES * len(topology.NETWORKS)
    # Locally administered unicast: bit 1 of the first octet set, bit 0 clear.
    assert all(int(mac.split(":")[0], 16) & 0b11 == 0b10 for mac in macs)


def test_fault_networks() -> None:
    assert [n.name for n in faults.resolve_nets("all")] == ["mgmt", "lan", "hb"]
    assert [n.name for n in faults.resolve_nets("hb")] == ["hb"]
    with pytest.raises(ValueError, match="expected one of mgmt, lan, hb, all"):
        faults.resolve_nets("wan")


def test_image_cache_key_follows_the_package_list(monkeypatch: pytest.MonkeyPatch) -> None:
    key = rootfs.cache_key()
    assert key == rootfs.cache_key()
    monkeypatch.setattr(rootfs, "PACKAGES", (*rootfs.PACKAGES, "tcpdump"))
    assert rootfs.cache_key() != key


def test_cli_parses_every_verb() -> None:
    parser = _parser()
    assert parser.parse_args(["up", "--nodes", "3"]).nodes == 3
    assert parser.parse_args(["cut", "node1", "--net", "hb"]).net == "hb"
    args = parser.parse_args(["loss", "node2", "30"])
    assert (args.node, args.percent, args.net) == ("node2", 30, "all")
    assert parser.parse_args(["exec", "node1", "--", "ip", "addr"]).cmd == ["ip", "addr"]
    with pytest.raises(SystemExit):
        parser.parse_args(["cut", "node1", "--net", "wan"])
