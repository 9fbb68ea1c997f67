"""The nftables ruleset of a farm module: render, apply atomically, update buckets, remove.

One module owns three tables named `hapair-farm-<module>`:

- `netdev`: on the VIP interface's ingress, frames to the virtual MAC get `pkttype host`
  (the kernel marks them multicast or other-host, and TCP drops those);
- `arp`: the kernel's own ARP packets for the VIP are dropped on output (arp.py answers);
- `ip`: for packets to the VIP, `jhash <client address[ . port]> mod 256 seed S` looked up
  in the set `mine` of this node's buckets. TCP: `ct state established,related` is accepted
  first, a bare SYN in one of our buckets starts a new connection (counted in `served`),
  a segment in an orphan bucket (taken from a node that died) goes to our stack, which
  resets it; everything else is dropped (counted in `foreign`): a node never answers, and so
  never resets, a connection a live node serves. UDP: the bucket alone decides (datagrams follow
  their bucket when it moves; there is no connection to keep).

A bucket change rewrites only the set's elements, in one `nft -f` transaction.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jinja2
import trio

from ha_runtime.config import FarmRule
from ha_runtime.farm.spec import FarmSpec

NFT = "nft"

# The template sits at the package's top level: package-data ships `*.j2` from there only.
_env = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,
)


@functools.cache
def _template() -> jinja2.Template:
    source = importlib.resources.files("ha_runtime.farm").joinpath("farm.nft.j2").read_text()
    return _env.from_string(source)


class NftError(RuntimeError):
    pass


@dataclass(frozen=True)
class _RenderedRule:
    protocol: str
    ports: str
    key: str


def _ports(rule: FarmRule) -> str:
    items = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in rule.ports]
    return "{ " + ", ".join(items) + " }"


def _key(rule: FarmRule) -> str:
    if rule.hash == "address":
        return "ip saddr"
    return f"ip saddr . {rule.protocol} sport"


def render_ruleset(spec: FarmSpec, buckets: Iterable[int], orphans: Iterable[int] = ()) -> str:
    """The whole ruleset, replacing any previous one of the module atomically."""
    rules = [_RenderedRule(r.protocol, _ports(r), _key(r)) for r in spec.rules]
    return _template().render(
        spec=spec,
        rules=rules,
        buckets=sorted(set(buckets)),
        orphans=sorted(set(orphans)),
        seed=f"0x{spec.seed:08x}",
    )


def render_bucket_update(
    spec: FarmSpec, buckets: Iterable[int], orphans: Iterable[int] = ()
) -> str:
    """Replace this node's buckets (and orphans), in one transaction: no packet sees a
    half-updated set."""
    lines = []
    for name, items in (("mine", buckets), ("orphans", orphans)):
        lines.append(f"flush set ip {spec.table} {name}")
        elements = sorted(set(items))
        if elements:
            text = ", ".join(str(b) for b in elements)
            lines.append(f"add element ip {spec.table} {name} {{ {text} }}")
    return "\n".join(lines) + "\n"


def render_removal(spec: FarmSpec) -> str:
    """Delete the module's tables; succeeds when they do not exist."""
    return "".join(
        f"add table {f} {spec.table}\ndelete table {f} {spec.table}\n"
        for f in ("netdev", "arp", "ip")
    )


async def nft(script: str) -> None:
    """Run an nft script as one atomic transaction."""
    result = await trio.run_process(
        [NFT, "-f", "-"],
        stdin=script.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if result.returncode != 0:
        raise NftError(f"nft -f failed: {result.stderr.decode(errors='replace').strip()}")


async def nft_json(*args: str) -> Any:
    result = await trio.run_process(
        [NFT, "-j", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    if result.returncode != 0:
        raise NftError(f"nft {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")
    return json.loads(result.stdout)


async def apply(spec: FarmSpec, buckets: Iterable[int], orphans: Iterable[int] = ()) -> None:
    await nft(render_ruleset(spec, buckets, orphans))


async def update_buckets(
    spec: FarmSpec, buckets: Iterable[int], orphans: Iterable[int] = ()
) -> None:
    await nft(render_bucket_update(spec, buckets, orphans))


async def remove(spec: FarmSpec) -> None:
    await nft(render_removal(spec))


async def read_counters(spec: FarmSpec) -> dict[str, int]:
    """Packets counted by the named counters: `served` = new connections (TCP SYNs, new UDP
    flows) this node accepted, `foreign` = packets to the VIP left to other nodes."""
    out: dict[str, int] = {}
    for name in ("served", "foreign"):
        data = await nft_json("list", "counter", "ip", spec.table, name)
        for item in data.get("nftables", []):
            counter = item.get("counter")
            if counter:
                out[name] = int(counter.get("packets", 0))
    return out


async def read_buckets(spec: FarmSpec) -> frozenset[int]:
    """The elements of the set `mine` as the kernel has them (for status and tests)."""
    data = await nft_json("list", "set", "ip", spec.table, "mine")
    for item in data.get("nftables", []):
        s = item.get("set")
        if s and "elem" in s:
            return frozenset(int(e) for e in s["elem"])
    return frozenset()
