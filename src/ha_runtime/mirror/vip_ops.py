"""How a mirror module adds and removes its VIP: netlink on a node, a fake in tests."""

from __future__ import annotations

from typing import Protocol

import trio

from ha_runtime import vip
from ha_runtime.config import ModuleConfig


class VipOps(Protocol):
    async def add(self, m: ModuleConfig) -> None: ...
    async def remove(self, m: ModuleConfig) -> None: ...
    def held(self, m: ModuleConfig) -> bool | None: ...


class NetlinkVip:
    async def add(self, m: ModuleConfig) -> None:
        if m.vip is None:
            return
        await trio.to_thread.run_sync(vip.add_vip, m.vip)
        # Announce in the background: the application starts while the ARP bursts go out.
        trio.lowlevel.spawn_system_task(vip.announce, m.vip)

    async def remove(self, m: ModuleConfig) -> None:
        if m.vip is not None:
            await trio.to_thread.run_sync(vip.remove_vip, m.vip)

    def held(self, m: ModuleConfig) -> bool | None:
        if m.vip is None:
            return None
        try:
            return vip.has_vip(m.vip)
        except (OSError, vip.VipError):
            return None
