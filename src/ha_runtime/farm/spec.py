"""What the farm engine of one module runs on: powers, rules, virtual MAC, hash seed.

The `farm:` section of a module file is parsed by the config package
(ha_runtime/config/farm.py) into `ModuleConfig.farm`; `FarmSpec.from_module` joins it with
the common module fields into the one immutable value the farm engine uses.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from ha_runtime.config import FarmRule, FarmSettings, ModuleConfig
from ha_runtime.config.farm import MacMode


@dataclass(frozen=True)
class FarmSpec:
    """Everything the farm engine of one module needs; identical on every node."""

    module: str
    vip: str  # IPv4 address, no prefix
    interface: str
    powers: tuple[tuple[str, int], ...]  # every configured node with its power, config order
    rules: tuple[FarmRule, ...]
    mac_mode: MacMode
    mac: str
    seed: int  # jhash seed: must be the same on every node, so derived from the module name
    witness: bool = False  # the module has witness addresses (isolation rule of member.py)
    # A bucket whose owner is still alive is taken this long after the map gives it to us:
    # the owner hears the change one heartbeat later and releases it first (member.py).
    handover_s: float = 0.0

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.powers)

    @property
    def power_map(self) -> dict[str, int]:
        return dict(self.powers)

    @property
    def table(self) -> str:
        """nftables table name (the same name in the netdev, arp and inet families)."""
        return f"hapair-farm-{self.module}"

    @classmethod
    def from_module(cls, module: ModuleConfig, farm: FarmSettings) -> FarmSpec:
        if module.type != "farm":
            raise ValueError(f"module {module.name} is a {module.type} module, not a farm")
        if module.vip is None:
            raise ValueError(f"module {module.name} has no vip")
        power = dict(farm.power)
        unknown = sorted(set(power) - set(module.nodes))
        if unknown:
            raise ValueError(f"farm.power names nodes not in the module: {', '.join(unknown)}")
        return cls(
            module=module.name,
            vip=module.vip.address,
            interface=module.vip.interface,
            powers=tuple((n, power.get(n, 1)) for n in module.nodes),
            rules=farm.rules or (FarmRule("tcp", ((1, 65535),), "address_port"),),
            mac_mode=farm.mac_mode,
            mac=farm.mac or default_mac(module.vip.address, farm.mac_mode),
            seed=seed_for(module.name),
            witness=bool(module.witness),
            handover_s=handover_delay(module.heartbeat.interval_ms / 1000),
        )


def handover_delay(interval_s: float) -> float:
    """Three heartbeat intervals (at least 0.2 s): the new member announces itself at once,
    so the owner has heard it after one interval even with a lost heartbeat or two."""
    return max(0.2, 3 * interval_s)


def seed_for(module: str) -> int:
    """The jhash seed of a module. nft picks a random seed when none is given, which would
    make every node hash differently; it must be explicit and equal everywhere."""
    return int.from_bytes(hashlib.blake2b(module.encode(), digest_size=4).digest(), "big")


def default_mac(vip: str, mode: MacMode) -> str:
    """The module's virtual MAC, derived from the VIP so every node agrees without config.

    multicast: 01:00:5e:7f:X:Y (X.Y = the VIP's last two octets), the MAC of the IPv4 group
    239.255.X.Y, as Microsoft NLB's "IGMP multicast" mode: nodes join that group, so NICs
    accept the MAC and IGMP-snooping switches learn which ports want it.
    unicast: 02:bf:A:B:C:D (the whole VIP), a locally administered unicast MAC that no
    frame ever carries as its source, so switches never learn it and flood it.
    """
    octets = ipaddress.IPv4Address(vip).packed
    if mode == "multicast":
        raw = bytes((0x01, 0x00, 0x5E, 0x7F, octets[2], octets[3]))
    else:
        raw = bytes((0x02, 0xBF)) + octets
    return ":".join(f"{b:02x}" for b in raw)


def igmp_group(mac: str) -> str:
    """The IPv4 group whose MAC is `mac` (01:00:5e:0x:xx:xx), in 239.128.0.0/9."""
    b = bytes.fromhex(mac.replace(":", ""))
    return str(ipaddress.IPv4Address(bytes((239, 0x80 | b[3], b[4], b[5]))))
