"""Add and remove a module's virtual IP with netlink (pyroute2), and announce moves.

After adding the address we send gratuitous ARP frames so that switches and the
clients' ARP caches learn the VIP's new MAC at once instead of after their cache expires:
several frames, spaced, then a second burst a few seconds later (as keepalived does),
because one frame can be lost on a busy or just-reconfigured switch port.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ha_runtime.config import VipSpec

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


@dataclass(frozen=True)
class GarpPolicy:
    count: int = 5
    spacing_s: float = 0.2
    repeat_after_s: float = 5.0  # second burst; 0 disables


class VipError(Exception):
    pass


def _ifindex(ipr: IPRoute, interface: str) -> int:
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise VipError(f"interface {interface} does not exist")
    return int(found[0])


def has_vip(vip: VipSpec) -> bool:
    with IPRoute() as ipr:
        idx = _ifindex(ipr, vip.interface)
        return any(
            a.get("address") == vip.address and a["prefixlen"] == vip.prefixlen
            for a in ipr.get_addr(index=idx, family=socket.AF_INET)
        )


def add_vip(vip: VipSpec) -> bool:
    """Add the VIP; True if it was added, False if it was already there."""
    with IPRoute() as ipr:
        idx = _ifindex(ipr, vip.interface)
        try:
            ipr.addr("add", index=idx, address=vip.address, prefixlen=vip.prefixlen)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise VipError(f"cannot add {vip.cidr} to {vip.interface}: {exc}") from exc
    return True


def remove_vip(vip: VipSpec) -> bool:
    """Remove the VIP; True if it was removed, False if it was not there."""
    with IPRoute() as ipr:
        try:
            idx = _ifindex(ipr, vip.interface)
        except VipError:
            return False  # no interface, no address
        try:
            ipr.addr("del", index=idx, address=vip.address, prefixlen=vip.prefixlen)
        except NetlinkError as exc:
            if exc.code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                return False
            raise VipError(f"cannot remove {vip.cidr} from {vip.interface}: {exc}") from exc
    return True


def interface_mac(interface: str) -> bytes:
    text = Path(f"/sys/class/net/{interface}/address").read_text().strip()
    return bytes.fromhex(text.replace(":", ""))


def garp_frame(mac: bytes, ip: str) -> bytes:
    """A gratuitous ARP request: sender and target protocol address are both the VIP."""
    addr = socket.inet_aton(ip)
    eth = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + addr + b"\x00" * 6 + addr
    return eth + arp


def send_garp(interface: str, ip: str) -> None:
    frame = garp_frame(interface_mac(interface), ip)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((interface, 0))
        s.send(frame)


async def announce(vip: VipSpec, policy: GarpPolicy = GarpPolicy()) -> None:
    """Send the gratuitous ARP bursts; errors are logged, never raised (the VIP is up)."""
    bursts = [0.0] + ([policy.repeat_after_s] if policy.repeat_after_s > 0 else [])
    waited = 0.0
    for at in bursts:
        await trio.sleep(max(0.0, at - waited))
        for n in range(policy.count):
            try:
                await trio.to_thread.run_sync(send_garp, vip.interface, vip.address)
            except OSError as exc:
                log.warning(
                    "gratuitous ARP for %s on %s failed: %s", vip.address, vip.interface, exc
                )
                return
            if n + 1 < policy.count:
                await trio.sleep(policy.spacing_s)
        waited = at + policy.spacing_s * (policy.count - 1)
