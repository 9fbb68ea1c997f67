"""What a farm module needs beyond the common module file: powers, rules, virtual MAC.

`parse_farm_section` validates the `farm:` section of a module file (docs/farm.md) with the
same error style as config.py (file, field path, what was expected, every error at once);
config.py calls it for `type: farm` and keeps the result in `ModuleConfig.farm`;
`FarmSpec.from_module` joins both into the one immutable value the farm engine uses.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ha_runtime.config import ModuleConfig

MacMode = Literal["multicast", "unicast"]
Protocol = Literal["tcp", "udp"]
HashOn = Literal["address", "address_port"]

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
PORT_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
MAX_POWER = 1000
FARM_FIELDS = frozenset({"mac_mode", "mac", "power", "rules"})
RULE_FIELDS = frozenset({"protocol", "ports", "hash"})


@dataclass(frozen=True)
class FarmRule:
    """One load-balancing rule: which packets to the VIP are shared out, and on what key."""

    protocol: Protocol
    ports: tuple[tuple[int, int], ...]  # inclusive ranges, single ports as (p, p)
    hash: HashOn


@dataclass(frozen=True)
class FarmSettings:
    """The validated `farm:` section of a module file."""

    mac_mode: MacMode = "multicast"
    mac: str | None = None
    power: tuple[tuple[str, int], ...] = ()
    rules: tuple[FarmRule, ...] = ()


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


# --------------------------------------------------------------------------- validation


class _Errors:
    def __init__(self, path: Path, where: str) -> None:
        self.path = path
        self.where = where
        self.errors: list[str] = []

    def err(self, field: str, msg: str) -> None:
        self.errors.append(f"{self.path}: {self.where}.{field}: {msg}" if field else msg)


def parse_farm_section(
    data: Any, path: Path, nodes: tuple[str, ...], where: str = "farm"
) -> tuple[FarmSettings | None, list[str]]:
    """Validate the `farm:` mapping of a module file; returns the settings or every error."""
    e = _Errors(path, where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [f"{path}: {where}: expected a mapping, got {type(data).__name__}"]
    for key in data:
        if key not in FARM_FIELDS:
            e.err(str(key), f"unknown field (allowed here: {', '.join(sorted(FARM_FIELDS))})")
    mode = data.get("mac_mode", "multicast")
    if mode not in ("multicast", "unicast"):
        e.err("mac_mode", f"expected one of multicast, unicast, got {mode!r}")
        mode = "multicast"
    mac = _parse_mac(e, data.get("mac"), mode)
    power = _parse_power(e, data.get("power", {}), nodes)
    rules = _parse_rules(e, data.get("rules"))
    if e.errors:
        return None, e.errors
    return FarmSettings(
        mac_mode="unicast" if mode == "unicast" else "multicast",
        mac=mac,
        power=tuple(sorted(power.items())),
        rules=tuple(rules),
    ), []


def _parse_mac(e: _Errors, value: Any, mode: str) -> str | None:
    if value is None:
        return None
    text = value.lower() if isinstance(value, str) else ""
    if not MAC_RE.match(text):
        e.err("mac", f"expected a MAC address like 01:00:5e:7f:00:c8, got {value!r}")
        return None
    first = int(text[:2], 16)
    if mode == "multicast" and not (text.startswith("01:00:5e:") and int(text[9:11], 16) < 0x80):
        e.err("mac", f"expected a multicast MAC in 01:00:5e:00:00:00-7f:ff:ff, got {text}")
        return None
    if mode == "unicast" and first & 1:
        e.err("mac", f"expected a unicast MAC (first octet even) for mac_mode unicast, got {text}")
        return None
    return text


def _parse_power(e: _Errors, value: Any, nodes: tuple[str, ...]) -> dict[str, int]:
    if not isinstance(value, dict):
        e.err("power", "expected a mapping node -> integer power")
        return {}
    out: dict[str, int] = {}
    for name, p in value.items():
        if name not in nodes:
            e.err(f"power.{name}", f"expected one of the module's nodes ({', '.join(nodes)})")
        elif isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= MAX_POWER:
            e.err(f"power.{name}", f"expected an integer between 1 and {MAX_POWER}, got {p!r}")
        else:
            out[name] = p
    return out


def _parse_rules(e: _Errors, value: Any) -> list[FarmRule]:
    if value is None:
        e.err("rules", "required field is missing (at least one rule)")
        return []
    if not isinstance(value, list) or not value:
        e.err("rules", "expected a non-empty list of rules")
        return []
    rules: list[FarmRule] = []
    for i, raw in enumerate(value):
        w = f"rules[{i}]"
        if not isinstance(raw, dict):
            e.err(w, "expected a mapping with protocol, ports, hash")
            continue
        for key in raw:
            if key not in RULE_FIELDS:
                e.err(
                    f"{w}.{key}", f"unknown field (allowed here: {', '.join(sorted(RULE_FIELDS))})"
                )
        proto = raw.get("protocol", "tcp")
        if proto not in ("tcp", "udp"):
            e.err(f"{w}.protocol", f"expected one of tcp, udp, got {proto!r}")
        hash_on = raw.get("hash", "address_port")
        if hash_on not in ("address", "address_port"):
            e.err(f"{w}.hash", f"expected one of address, address_port, got {hash_on!r}")
        ports = _parse_ports(e, raw.get("ports"), f"{w}.ports")
        if ports and proto in ("tcp", "udp") and hash_on in ("address", "address_port"):
            rules.append(
                FarmRule(
                    protocol="tcp" if proto == "tcp" else "udp",
                    ports=ports,
                    hash="address" if hash_on == "address" else "address_port",
                )
            )
    return rules


def _parse_ports(e: _Errors, value: Any, where: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or not value:
        e.err(where, "expected a non-empty list of ports or ranges like 8080 or '9000-9010'")
        return ()
    out: list[tuple[int, int]] = []
    for i, p in enumerate(value):
        lo = hi = -1
        if isinstance(p, int) and not isinstance(p, bool):
            lo = hi = p
        elif isinstance(p, str) and (m := PORT_RE.match(p)):
            lo = int(m.group(1))
            hi = int(m.group(2) or m.group(1))
        if not 1 <= lo <= hi <= 65535:
            e.err(f"{where}[{i}]", f"expected a port 1-65535 or a range lo-hi, got {p!r}")
        else:
            out.append((lo, hi))
    return tuple(out)
