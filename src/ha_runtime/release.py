"""Give up, without the daemon, everything that makes this node answer for a module.

Run by systemd after the daemon's process has ended for any reason (``ExecStopPost`` of
hapair.service): a daemon killed with SIGKILL (or crashed) cannot remove its virtual IPs
and farm rules itself, and the peer takes them over once the heartbeats stop, so without
this both nodes would hold a mirror VIP, or accept the same farm buckets, until the
restarted daemon decides again. A daemon that stopped normally already released them: then
this changes nothing. The applications are left alone (their own units, stopped by the
module scripts); they cannot be reached without the VIP.

It must be done before the peer takes over, one heartbeat timeout after the death (1 s in
the lab): a fresh interpreter that imports the configuration, trio and pyroute2 on a loaded
node does not always make it. So the daemon writes, at its start, the same release as a
*plan* for two compiled tools (`release.nft` for `nft -f`, `release.ip` for
`ip -force -batch`), which hapair.service runs first; `hactl release` runs after them and
catches what a plan cannot (a daemon that died before writing one). Both plans are
idempotent: after a normal stop they find nothing and change nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from ha_runtime.config import ConfigError, FarmSettings, ModuleConfig, SiteConfig, load_site
from ha_runtime.farm import netif, ruleset
from ha_runtime.farm.spec import FarmSpec
from ha_runtime.vip import VipError, has_vip, remove_vip

log = logging.getLogger("hapair.release")

PLAN_NFT = "release.nft"
PLAN_IP = "release.ip"
_PLAN_HEADER = (
    "# hapair: written by the daemon at its start, run by hapair.service's ExecStopPost\n"
    "# after the daemon ended, so a killed daemon's {what} go before the peer takes them.\n"
)


@dataclass(frozen=True)
class ReleasePlan:
    nft: str  # an `nft -f` script: deletes each farm module's tables (none: no error)
    ip: str  # an `ip -force -batch` script: flushes each VIP address (absent: no error)


def release_plan(node: str, modules: Iterable[ModuleConfig]) -> ReleasePlan:
    """What `release_site` does, as scripts for nft and ip that need no interpreter."""
    nft = [_PLAN_HEADER.format(what="farm rules")]
    ip = [_PLAN_HEADER.format(what="virtual IPs")]
    for m in modules:
        if node not in m.nodes:
            continue
        if m.type == "mirror" and m.vip is not None:
            # `to A/32` matches the address whatever its prefix length, and only it
            ip.append(f"address flush dev {m.vip.interface} to {m.vip.address}/32\n")
        elif m.type == "farm":
            spec = FarmSpec.from_module(m, m.farm or FarmSettings())
            nft.append(ruleset.render_removal(spec))
            ip.append(f"address flush dev {spec.interface} to {spec.vip}/32\n")
    return ReleasePlan("".join(nft), "".join(ip))


def write_plan(state_dir: Path, plan: ReleasePlan) -> bool:
    """Replace both plan files atomically: a death mid-write leaves the previous plan.

    False, logged, when they cannot be written (a full disk): the daemon starts all the
    same, and `hactl release` remains the unit's last ExecStopPost."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        for name, text in ((PLAN_NFT, plan.nft), (PLAN_IP, plan.ip)):
            tmp = state_dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, state_dir / name)
    except OSError as exc:
        log.warning(
            "cannot write the release plan in %s (%s): only hactl release will run", state_dir, exc
        )
        return False
    return True


def release_site(site: SiteConfig) -> list[str]:
    """Remove every mirror VIP and farm ruleset of this node's modules; what was done."""
    done: list[str] = []
    node = site.cluster.node
    for m in site.modules:
        if node not in m.nodes:
            continue
        try:
            if m.type == "mirror" and m.vip is not None and has_vip(m.vip):
                remove_vip(m.vip)
                done.append(f"{m.name}: removed {m.vip.address}/{m.vip.prefixlen}")
            elif m.type == "farm":
                spec = FarmSpec.from_module(m, m.farm or FarmSettings())
                trio.run(ruleset.remove, spec)
                netif.del_vip(spec.interface, spec.vip)
                done.append(f"{m.name}: removed the farm rules and {spec.vip}")
        except (VipError, ruleset.NftError, OSError) as exc:
            # one module's failure must not keep the others' addresses in place
            done.append(f"{m.name}: could not release: {exc}")
    return done


def main(config: Path) -> int:
    try:
        site = load_site(config)
    except ConfigError as exc:
        errors = exc.errors
    else:
        errors = []
    if errors:
        for line in errors:
            log.error("%s", line)
        return 1
    for line in release_site(site):
        log.warning("release: %s", line)
    return 0
