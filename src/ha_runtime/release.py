"""Give up, without the daemon, everything that makes this node answer for a module.

Run by systemd after the daemon's process has ended for any reason (``ExecStopPost`` of
hapair.service): a daemon killed with SIGKILL (or crashed) cannot remove its virtual IPs
and farm rules itself, and the peer takes them over once the heartbeats stop, so without
this both nodes would hold a mirror VIP, or accept the same farm buckets, until the
restarted daemon decides again. A daemon that stopped normally already released them: then
this changes nothing. The applications are left alone (their own units, stopped by the
module scripts); they cannot be reached without the VIP.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from ha_runtime.config import ConfigError, FarmSettings, SiteConfig, load_site
from ha_runtime.farm import netif, ruleset
from ha_runtime.farm.spec import FarmSpec
from ha_runtime.vip import VipError, has_vip, remove_vip

log = logging.getLogger("hapair.release")


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
