"""How a mirror module adds and removes its VIP: netlink on a node, a fake in tests."""

from __future__ import annotations

from typing import Protocol

import trio

from ha_runtime import vip
from ha_runtime.config import ModuleConfig, VipSpec


class VipOps(Protocol):
    async def add(self, m: ModuleConfig) -> None: ...
    async def remove(self, m: ModuleConfig) -> None: ...
    def held(self, m: ModuleConfig) -> bool | None: ...


class NetlinkVip:
    def __init__(self) -> None:
        # The announcement of each VIP this node added, while it sends: stopped, and waited
        # for, before the address goes. A burst sent after a handover (the second one comes
        # 5 s after the first) told the clients the VIP was still here, and they sent to
        # this node until the new holder's own second burst: up to 5 s without service.
        self._announcing: dict[tuple[str, str], tuple[trio.CancelScope, trio.Event]] = {}

    async def add(self, m: ModuleConfig) -> None:
        if m.vip is None:
            return
        await trio.to_thread.run_sync(vip.add_vip, m.vip)
        await self._stop_announcing(m.vip)
        # Announce in the background: the application starts while the ARP bursts go out.
        # Registered before the task runs: a remove() right after add() stops it too.
        running = self._announcing[(m.vip.interface, m.vip.address)] = (
            trio.CancelScope(),
            trio.Event(),
        )
        trio.lowlevel.spawn_system_task(self._announce, m.vip, *running)

    async def _announce(self, spec: VipSpec, scope: trio.CancelScope, done: trio.Event) -> None:
        key = (spec.interface, spec.address)
        try:
            with scope:
                await vip.announce(spec)
        finally:
            done.set()
            if self._announcing.get(key) == (scope, done):
                del self._announcing[key]

    async def remove(self, m: ModuleConfig) -> None:
        if m.vip is not None:
            await self._stop_announcing(m.vip)
            await trio.to_thread.run_sync(vip.remove_vip, m.vip)

    async def _stop_announcing(self, spec: VipSpec) -> None:
        """End this VIP's announcement, a frame being sent included, before going on."""
        running = self._announcing.pop((spec.interface, spec.address), None)
        if running is not None:
            running[0].cancel()
            await running[1].wait()

    def held(self, m: ModuleConfig) -> bool | None:
        if m.vip is None:
            return None
        try:
            return vip.has_vip(m.vip)
        except (OSError, vip.VipError):
            return None
