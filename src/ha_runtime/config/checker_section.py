"""The `checkers:` list of a module file: what each checker type accepts, and its parser."""

from __future__ import annotations

import shlex
from typing import Any

from ha_runtime.config.errors import Collector, show
from ha_runtime.config.model import (
    APP_CHECKER_TYPES,
    CheckerAction,
    CheckerSpec,
    CheckerType,
    VipSpec,
)
from ha_runtime.config.names import IFNAME_RE, NAME_RE

CHECKER_TYPES: tuple[CheckerType, ...] = (
    "process",
    "unit",
    "tcp",
    "command",
    "interface",
    "witness",
)
CHECKER_ACTIONS: tuple[CheckerAction, ...] = ("restart", "failover", "wait")
# Fields each checker type accepts on top of the common ones; the app-level types also
# take `start_grace_s`.
CHECKER_FIELDS: dict[str, frozenset[str]] = {
    "process": frozenset({"process"}),
    "unit": frozenset({"unit"}),
    "tcp": frozenset({"host", "port"}),
    "command": frozenset({"command"}),
    "interface": frozenset({"interface"}),
    "witness": frozenset({"addresses"}),
}
CHECKER_FIELDS.update({t: CHECKER_FIELDS[t] | {"start_grace_s"} for t in APP_CHECKER_TYPES})
COMMON_CHECKER_FIELDS = frozenset({"name", "type", "interval_s", "timeout_s", "action"})


def parse_checkers(
    v: Collector, value: Any, witness: tuple[str, ...], vip: VipSpec | None
) -> list[CheckerSpec]:
    if not isinstance(value, list):
        v.err("checkers", f"expected a list, got {show(value)}")
        return []
    out: list[CheckerSpec] = []
    names: set[str] = set()
    for i, item in enumerate(value):
        where = f"checkers[{i}]"
        ctype = item.get("type") if isinstance(item, dict) else None
        allowed = COMMON_CHECKER_FIELDS | CHECKER_FIELDS.get(str(ctype), frozenset())
        d = v.mapping(item, where, allowed)
        if d is None:
            continue
        name = v.string(v.required(d, "name", where), f"{where}.name", NAME_RE, "a checker name")
        if name is not None:
            if name in names:
                v.err(f"{where}.name", f"duplicate checker name {name!r}")
            names.add(name)
        t = v.choice(v.required(d, "type", where), f"{where}.type", CHECKER_TYPES)
        interval = v.number(d.get("interval_s", 5), f"{where}.interval_s", 0.1, 3600)
        timeout = v.number(d.get("timeout_s", 3), f"{where}.timeout_s", 0.1, 3600)
        default_action = "restart" if t in APP_CHECKER_TYPES else "wait"
        action = v.choice(d.get("action", default_action), f"{where}.action", CHECKER_ACTIONS)
        spec = _checker_details(v, d, where, t, witness=witness, vip=vip)
        if None in (name, t, interval, timeout, action) or spec is None:
            continue
        assert name and t and interval and timeout and action
        out.append(
            CheckerSpec(
                name=name,
                type=t,  # type: ignore[arg-type]
                interval_s=interval,
                timeout_s=timeout,
                action=action,  # type: ignore[arg-type]
                **spec,
            )
        )
    return out


def _checker_details(
    v: Collector,
    d: dict[str, Any],
    where: str,
    t: str | None,
    *,
    witness: tuple[str, ...],
    vip: VipSpec | None,
) -> dict[str, Any] | None:
    if t in APP_CHECKER_TYPES:
        grace = v.number(d.get("start_grace_s", 10), f"{where}.start_grace_s", 0, 3600)
        app = _app_checker_details(v, d, where, t)
        return None if grace is None or app is None else {**app, "start_grace_s": grace}
    if t == "interface":
        default = vip.interface if vip is not None else None
        iface = v.string(
            d.get("interface", default), f"{where}.interface", IFNAME_RE, "an interface name"
        )
        return None if iface is None else {"interface": iface}
    if t == "witness":
        addrs = v.str_list(d.get("addresses", list(witness)), f"{where}.addresses", v.ipv4)
        if not addrs:
            v.err(f"{where}.addresses", "expected at least one address (or a module witness list)")
            return None
        return {"addresses": tuple(addrs)}
    return None


def _app_checker_details(
    v: Collector, d: dict[str, Any], where: str, t: str
) -> dict[str, Any] | None:
    if t == "process":
        p = v.string(v.required(d, "process", where), f"{where}.process")
        return None if p is None else {"process": p}
    if t == "unit":
        u = v.string(v.required(d, "unit", where), f"{where}.unit")
        return None if u is None else {"unit": u}
    if t == "tcp":
        host = v.ipv4(d.get("host", "127.0.0.1"), f"{where}.host")
        port = v.integer(v.required(d, "port", where), f"{where}.port", 1, 65535)
        return None if host is None or port is None else {"host": host, "port": port}
    if t == "command":
        raw = v.required(d, "command", where)
        argv: list[str] = []
        if isinstance(raw, str):
            try:
                argv = shlex.split(raw)
            except ValueError:
                argv = []
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            argv = list(raw)
        if raw is not None and (not argv or not argv[0].startswith("/")):
            v.err(
                f"{where}.command",
                f"expected a command line starting with an absolute path, got {show(raw)}",
            )
            return None
        return None if not argv else {"command": tuple(argv)}
    return None
