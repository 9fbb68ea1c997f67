"""Answer ARP for the farm VIP with the module's virtual MAC, from a raw AF_PACKET socket.

Every node of the farm holds the VIP, and every node answers "VIP is at <virtual MAC>":
the answers are identical, so it does not matter which one a client keeps. The kernel's
own answers (with the node's MAC) are dropped by the module's `arp` nftables table; packet
sockets are not seen by netfilter, so ours go out.

Frame details that matter on a real switch:
- the Ethernet *source* of what we send is the node's own MAC, never the virtual MAC: a
  switch that saw the unicast virtual MAC as a source would learn it on one port and stop
  flooding it (the "invisible" unicast mode depends on it never being learnt), and a
  multicast address is not a valid source at all;
- the ARP *sender hardware address* is the virtual MAC: that is what clients cache.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass

import trio

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST = b"\xff" * 6
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_ETH = struct.Struct("!6s6sH")


def mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True)
class ArpPacket:
    eth_src: bytes
    eth_dst: bytes
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes


def parse(frame: bytes) -> ArpPacket | None:
    """An Ethernet/IPv4 ARP packet, or None for anything else (malformed, other types)."""
    if len(frame) < _ETH.size + _ARP.size:
        return None
    dst, src, ethertype = _ETH.unpack_from(frame)
    if ethertype != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, _ETH.size)
    if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4:
        return None
    return ArpPacket(src, dst, op, sha, spa, tha, tpa)


def build(  # noqa: PLR0917 - the fields of the ARP header, in wire order
    eth_src: bytes, eth_dst: bytes, op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes
) -> bytes:
    frame = _ETH.pack(eth_dst, eth_src, ETH_P_ARP) + _ARP.pack(
        1, ETH_P_IP, 6, 4, op, sha, spa, tha, tpa
    )
    return frame.ljust(60, b"\0")  # minimum Ethernet frame without FCS


def reply_for(request: ArpPacket, vip: bytes, vmac: bytes, own_mac: bytes) -> bytes | None:
    """Our answer to a frame, or None when it is not a request for the VIP."""
    if request.op != ARP_REQUEST or request.tpa != vip or request.spa == vip:
        return None
    return build(own_mac, request.sha, ARP_REPLY, vmac, vip, request.sha, request.spa)


def gratuitous(vip: bytes, vmac: bytes, own_mac: bytes) -> bytes:
    """A broadcast gratuitous ARP request announcing VIP -> virtual MAC (updates caches)."""
    return build(own_mac, BROADCAST, ARP_REQUEST, vmac, vip, b"\0" * 6, vip)


class ArpResponder:
    """The trio task answering ARP requests for one VIP on one interface."""

    def __init__(self, interface: str, vip: str, vmac: str) -> None:
        self.interface = interface
        self.vip = socket.inet_aton(vip)
        self.vmac = mac_bytes(vmac)
        self.requests = 0
        self.replies = 0
        self.own_mac = b""

    def _open(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        return sock

    async def announce(
        self, sock: trio.socket.SocketType, count: int = 3, spacing: float = 0.2
    ) -> None:
        """Gratuitous ARPs, spaced as keepalived does, so caches learn the virtual MAC."""
        frame = gratuitous(self.vip, self.vmac, self.own_mac)
        for i in range(count):
            if i:
                await trio.sleep(spacing)
            await sock.send(frame)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._open() as sock:
            await sock.bind((self.interface, ETH_P_ARP))
            self.own_mac = bytes(sock.getsockname()[4][:6])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.announce, sock)
                task_status.started()
                while True:
                    frame = await sock.recv(2048)
                    packet = parse(frame)
                    answer = (
                        None
                        if packet is None
                        else reply_for(packet, self.vip, self.vmac, self.own_mac)
                    )
                    if answer is not None:
                        self.requests += 1
                        await sock.send(answer)
                        self.replies += 1
