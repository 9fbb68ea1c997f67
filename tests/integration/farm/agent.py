"""A farm node for the namespace tests: FarmService + a tiny TCP server, driven on stdin.

Run inside a node namespace: `python agent.py CONFIG_JSON`. It prints `ready` once the
module is installed, then reads one JSON command per line on stdin and answers one JSON
line on stdout:
  {"op": "membership", "peers": [{"name", "alive", "eligible"}], "healthy": true}
      -> {"ok": true, "buckets": N} once the kernel's set matches the new membership
  {"op": "status"} -> FarmStatus as a dict
  {"op": "drain"} / {"op": "undrain"} -> {"ok": true, "buckets": N}
  {"op": "stop"} -> {"ok": true} after the module removed everything
The TCP server answers every line it receives with the node's name (the namespace name).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import trio

from ha_runtime.config import FarmRule
from ha_runtime.farm import FarmService, FarmSpec, Membership, PeerView
from ha_runtime.farm.spec import default_mac, seed_for


def spec_from(cfg: dict[str, Any]) -> FarmSpec:
    mode = cfg.get("mac_mode", "multicast")
    return FarmSpec(
        module=cfg["module"],
        vip=cfg["vip"],
        interface=cfg["interface"],
        powers=tuple((n, int(p)) for n, p in cfg["nodes"]),
        rules=tuple(
            FarmRule(r["protocol"], tuple(tuple(p) for p in r["ports"]), r["hash"])
            for r in cfg["rules"]
        ),
        mac_mode=mode,
        mac=default_mac(cfg["vip"], mode),
        seed=seed_for(cfg["module"]),
    )


async def serve(port: int, name: str, task_status: trio.TaskStatus[None]) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while data := await stream.receive_some(4096):
                buf += data
                while b"\n" in buf:
                    _, buf = buf.split(b"\n", 1)
                    await stream.send_all(name.encode() + b"\n")
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(port, host="0.0.0.0")
    task_status.started()
    await trio.serve_listeners(handler, listeners)


def say(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def settle(service: FarmService) -> None:
    while not service.synced:
        await trio.sleep(0.01)


async def main() -> None:
    cfg = json.loads(sys.argv[1])
    spec = spec_from(cfg)
    service = FarmService(spec, cfg["node"])
    send, recv = trio.open_memory_channel[Membership](16)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, cfg["port"], cfg["name"])
        run_done = trio.Event()

        async def run() -> None:
            await service.run(recv)
            run_done.set()

        nursery.start_soon(run)
        while service.installed_buckets is None:
            await trio.sleep(0.01)
        say("ready")
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buf = b""
        while True:
            data = await stdin.receive_some(65536)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = json.loads(line)
                op = cmd["op"]
                if op == "membership":
                    peers = tuple(
                        PeerView(p["name"], p["alive"], p["eligible"]) for p in cmd["peers"]
                    )
                    await send.send(Membership(peers=peers, healthy=cmd.get("healthy", True)))
                    await trio.sleep(0.05)
                    await settle(service)
                    say({"ok": True, "buckets": len(service.member.my_buckets)})
                elif op == "status":
                    say((await service.refresh()).as_dict())
                elif op in ("drain", "undrain"):
                    getattr(service, op)()
                    await settle(service)
                    say({"ok": True, "buckets": len(service.member.my_buckets)})
                elif op == "stop":
                    await send.aclose()
                    await run_done.wait()
                    say({"ok": True})
                    nursery.cancel_scope.cancel()
                    return
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
