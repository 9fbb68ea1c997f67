"""The `farm:` section of a farm module file (docs/farm.md): its values and its parser.

It lives with the configuration (not in ha_runtime.farm) so that the config package never
imports the farm engine, which imports the config: `ModuleConfig.farm` holds the
`FarmSettings` parsed here and `ha_runtime.farm.spec.FarmSpec.from_module` joins both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ha_runtime.config.errors import Collector

MacMode = Literal["multicast", "unicast"]
Protocol = Literal["tcp", "udp"]
HashOn = Literal["address", "address_port"]

# The bucket map's balancing search (farm/buckets.py) is measured up to this many nodes.
MAX_NODES = 8
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


def parse_farm_section(
    data: Any, path: Path, nodes: tuple[str, ...], where: str = "farm"
) -> tuple[FarmSettings | None, list[str]]:
    """Validate the `farm:` mapping of a module file; returns the settings or every error."""
    c = Collector(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        c.err(where, f"expected a mapping, got {type(data).__name__}")
        return None, c.errors
    c.unknown_keys(data, where, FARM_FIELDS)
    mode = data.get("mac_mode", "multicast")
    if mode not in ("multicast", "unicast"):
        c.err(f"{where}.mac_mode", f"expected one of multicast, unicast, got {mode!r}")
        mode = "multicast"
    mac = _parse_mac(c, data.get("mac"), mode, f"{where}.mac")
    power = _parse_power(c, data.get("power", {}), nodes, f"{where}.power")
    rules = _parse_rules(c, data.get("rules"), f"{where}.rules")
    if c.errors:
        return None, c.errors
    return FarmSettings(
        mac_mode="unicast" if mode == "unicast" else "multicast",
        mac=mac,
        power=tuple(sorted(power.items())),
        rules=tuple(rules),
    ), []


def _parse_mac(c: Collector, value: Any, mode: str, where: str) -> str | None:
    if value is None:
        return None
    text = value.lower() if isinstance(value, str) else ""
    if not MAC_RE.match(text):
        c.err(where, f"expected a MAC address like 01:00:5e:7f:00:c8, got {value!r}")
        return None
    first = int(text[:2], 16)
    if mode == "multicast" and not (text.startswith("01:00:5e:") and int(text[9:11], 16) < 0x80):
        c.err(where, f"expected a multicast MAC in 01:00:5e:00:00:00-7f:ff:ff, got {text}")
        return None
    if mode == "unicast" and first & 1:
        c.err(where, f"expected a unicast MAC (first octet even) for mac_mode unicast, got {text}")
        return None
    return text


def _parse_power(c: Collector, value: Any, nodes: tuple[str, ...], where: str) -> dict[str, int]:
    if not isinstance(value, dict):
        c.err(where, "expected a mapping node -> integer power")
        return {}
    out: dict[str, int] = {}
    for name, p in value.items():
        if name not in nodes:
            c.err(f"{where}.{name}", f"expected one of the module's nodes ({', '.join(nodes)})")
        elif isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= MAX_POWER:
            c.err(f"{where}.{name}", f"expected an integer between 1 and {MAX_POWER}, got {p!r}")
        else:
            out[name] = p
    return out


def _parse_rules(c: Collector, value: Any, where: str) -> list[FarmRule]:
    if value is None:
        c.err(where, "required field is missing (at least one rule)")
        return []
    if not isinstance(value, list) or not value:
        c.err(where, "expected a non-empty list of rules")
        return []
    rules: list[FarmRule] = []
    for i, raw in enumerate(value):
        w = f"{where}[{i}]"
        if not isinstance(raw, dict):
            c.err(w, "expected a mapping with protocol, ports, hash")
            continue
        c.unknown_keys(raw, w, RULE_FIELDS)
        proto = raw.get("protocol", "tcp")
        if proto not in ("tcp", "udp"):
            c.err(f"{w}.protocol", f"expected one of tcp, udp, got {proto!r}")
        hash_on = raw.get("hash", "address_port")
        if hash_on not in ("address", "address_port"):
            c.err(f"{w}.hash", f"expected one of address, address_port, got {hash_on!r}")
        ports = _parse_ports(c, raw.get("ports"), f"{w}.ports")
        if ports and proto in ("tcp", "udp") and hash_on in ("address", "address_port"):
            rules.append(
                FarmRule(
                    protocol="tcp" if proto == "tcp" else "udp",
                    ports=ports,
                    hash="address" if hash_on == "address" else "address_port",
                )
            )
    return rules


def _parse_ports(c: Collector, value: Any, where: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or not value:
        c.err(where, "expected a non-empty list of ports or ranges like 8080 or '9000-9010'")
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
            c.err(f"{where}[{i}]", f"expected a port 1-65535 or a range lo-hi, got {p!r}")
        else:
            out.append((lo, hi))
    return tuple(out)
