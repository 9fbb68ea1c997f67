"""The interface side of a farm node: VIP address, virtual MAC acceptance, ARP sysctls.

- The VIP is added as a /32 (`scope global`, label-free): a host address that changes no
  route and is never picked as the source for the subnet, on every node at once.
- `arp_announce = 2` on the interface: when the kernel resolves a neighbour it uses the
  node's own address as the ARP sender, never the VIP (an ARP request sent from the VIP
  with the node's MAC would re-point the client's cache to that one node).
- Multicast mode: the node joins the IPv4 group whose MAC is the virtual MAC
  (01:00:5e:7f:X:Y <-> 239.255.X.Y): the kernel programs the NIC's multicast filter with the
  MAC (as `ip maddr add` would) and answers IGMP queries, so snooping switches forward the
  MAC to the farm's ports. The membership is held by a socket for the module's lifetime.
- Unicast ("invisible") mode: the MAC is added to the NIC's unicast filter as a permanent
  `bridge fdb ... self` entry (like a secondary unicast address; no promiscuous mode).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from pathlib import Path

from pyroute2 import IPRoute

from ha_runtime.farm.spec import FarmSpec, igmp_group

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
SYSCTL = Path("/proc/sys/net/ipv4/conf")


def _index(ipr: IPRoute, interface: str) -> int:
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise OSError(errno.ENODEV, f"no interface {interface}")
    return int(found[0])


def add_vip(interface: str, vip: str) -> None:
    with IPRoute() as ipr:
        try:
            ipr.addr("add", index=_index(ipr, interface), address=vip, prefixlen=32)
        except Exception as exc:
            if getattr(exc, "code", None) != errno.EEXIST:
                raise


def del_vip(interface: str, vip: str) -> None:
    with IPRoute() as ipr, contextlib.suppress(Exception):
        ipr.addr("del", index=_index(ipr, interface), address=vip, prefixlen=32)


def set_arp_announce(interface: str, value: int = 2) -> int | None:
    """Set arp_announce on the interface; returns the previous value (None if unknown)."""
    path = SYSCTL / interface / "arp_announce"
    try:
        old = int(path.read_text().strip())
        path.write_text(f"{value}\n")
    except OSError:
        return None
    return old


def add_unicast_mac(interface: str, mac: str) -> None:
    with IPRoute() as ipr:
        try:
            ipr.fdb(
                "add",
                ifindex=_index(ipr, interface),
                lladdr=mac,
                state=NUD_PERMANENT,
                flags=NTF_SELF,
            )
        except Exception as exc:
            if getattr(exc, "code", None) != errno.EEXIST:
                raise


def del_unicast_mac(interface: str, mac: str) -> None:
    with IPRoute() as ipr, contextlib.suppress(Exception):
        ipr.fdb(
            "del", ifindex=_index(ipr, interface), lladdr=mac, state=NUD_PERMANENT, flags=NTF_SELF
        )


def join_group(interface: str, group: str) -> socket.socket:
    """A socket holding membership of `group` on the interface; close it to leave."""
    with IPRoute() as ipr:
        index = _index(ipr, interface)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        mreqn = struct.pack("=4s4si", socket.inet_aton(group), b"\0" * 4, index)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
    except BaseException:
        sock.close()
        raise
    return sock


class NodeInterface:
    """Installs and removes everything interface-side for one farm module (idempotent)."""

    def __init__(self, spec: FarmSpec) -> None:
        self.spec = spec
        self._group: socket.socket | None = None

    def setup(self) -> None:
        spec = self.spec
        set_arp_announce(spec.interface, 2)
        if spec.mac_mode == "multicast":
            if self._group is None:
                self._group = join_group(spec.interface, igmp_group(spec.mac))
        else:
            add_unicast_mac(spec.interface, spec.mac)
        add_vip(spec.interface, spec.vip)

    def teardown(self) -> None:
        spec = self.spec
        del_vip(spec.interface, spec.vip)
        if self._group is not None:
            self._group.close()
            self._group = None
        if spec.mac_mode == "unicast":
            del_unicast_mac(spec.interface, spec.mac)
        # arp_announce stays 2: another farm module may share the interface, and 2 is
        # harmless for everything else (the kernel still uses an address of the subnet).
