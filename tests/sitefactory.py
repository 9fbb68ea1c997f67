"""Site configs for tests, built in one place: a two-node site on loopback.

Every tier imports it as `tests.sitefactory` (pyproject puts the repository root on
pytest's path). The site is the one the docs describe, reduced to what a test on one host
needs: node1 at 127.0.0.1 and node2 at 127.0.0.2 on network `lan`, and a module of either
type with the VIP faked. Three forms:

- files (`write_site`): cluster.yml and modules/<name>.yml of one node, for `load_site`
  and a real NodeDaemon;
- parsed (`parsed_configs`): ClusterConfig and ModuleConfig, for a manager tested alone
  (no file is read; scripts and TLS paths are not checked);
- replication (`replication_cluster`, `replication_module`): the configs a replication
  service takes, both nodes at 127.0.0.1 (the link's two ends on one host).

Configs are made by the runtime's own parser, not by filling in its dataclasses, so a
test's site is one the runtime would accept from a file (a test then replaces what it
means to leave out, such as the scripts). Also here: the pair of daemons with the VIP
faked (`pair_daemons`, `FakeVip`), free ports and `wait`.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import yaml

from ha_runtime.config import (
    ClusterConfig,
    ModuleConfig,
    ScriptsSpec,
    load_site,
    parse_cluster,
    parse_module,
)
from ha_runtime.daemon import NodeDaemon

NODES = ("node1", "node2")
ADDRESSES = {"node1": "127.0.0.1", "node2": "127.0.0.2"}
MIRROR_VIP = "10.77.0.100/24"


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, pki: Path, node: str) -> Tls:
        """The layout every test PKI writes: pki/ca.crt, pki/<node>.crt, pki/<node>.key."""
        return cls(pki / "ca.crt", pki / f"{node}.crt", pki / f"{node}.key")


def cluster_data(
    node: str = "node1",
    *,
    state_dir: Path,
    site_key: Path | str = "/k",
    tls: Tls | None = None,
    addresses: Mapping[str, str] = ADDRESSES,
    **more: Any,
) -> dict[str, Any]:
    """cluster.yml of `node` as data; `more` adds or overrides keys (heartbeat_port,
    api_socket, modules_dir, console ...). Paths the parser does not open by default."""
    data: dict[str, Any] = {
        "node": node,
        "nodes": [{"name": n, "addresses": {"lan": addresses[n]}} for n in NODES],
        "site_key": str(site_key),
        "tls": (
            {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)}
            if tls
            else {"ca": "/a", "cert": "/b", "key": "/c"}
        ),
        "state_dir": str(state_dir),
        "metrics_address": "",
    }
    data.update({k: str(v) if isinstance(v, Path) else v for k, v in more.items()})
    return data


def module_data(
    name: str = "flightdata",
    kind: str = "mirror",
    *,
    scripts: Mapping[str, Any] | None = None,
    vip: str = MIRROR_VIP,
    interval_ms: int = 100,
    timeout_ms: int = 1000,
    **more: Any,
) -> dict[str, Any]:
    """modules/<name>.yml as data. A mirror starts on node1 by default; scripts default to
    /bin/true for the module type's pair (start_prim/stop_prim, start_both/stop_both)."""
    role = "both" if kind == "farm" else "prim"
    data: dict[str, Any] = {
        "name": name,
        "type": kind,
        "nodes": list(NODES),
        "vip": {"address": vip, "interface": "lan0"},
        "heartbeat": {"interval_ms": interval_ms, "timeout_ms": timeout_ms},
        "scripts": dict(scripts or {f"start_{role}": "/bin/true", f"stop_{role}": "/bin/true"}),
    }
    if kind == "mirror":
        data["default_primary"] = "node1"
    data.update(more)
    return _strings(data)


def _strings(value: Any) -> Any:
    """Paths as strings, at any depth (YAML and the parser take strings)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strings(v) for v in value]
    return value


def parsed_cluster(tmp: Path, node: str = "node1", **more: Any) -> ClusterConfig:
    """The parsed cluster.yml of `node` (state in tmp/state unless `more` says)."""
    data = cluster_data(node, **({"state_dir": tmp / "state"} | more))
    cluster, errors = parse_cluster(data, tmp / "cluster.yml")
    assert cluster is not None, errors
    return cluster


def parsed_module(tmp: Path, module: dict[str, Any], cluster: ClusterConfig) -> ModuleConfig:
    parsed, errors = parse_module(module, tmp / f"{module['name']}.yml", cluster, check_files=False)
    assert parsed is not None, errors
    return parsed


def parsed_configs(
    tmp: Path, module: dict[str, Any], node: str = "node1"
) -> tuple[ClusterConfig, ModuleConfig]:
    """The parsed configs of `node` with one module (module files are not checked)."""
    cluster = parsed_cluster(tmp, node)
    return cluster, parsed_module(tmp, module, cluster)


def replication_cluster(
    tmp: Path, node: str, tls: Any = None, state_dir: Path | None = None
) -> ClusterConfig:
    """`node`'s cluster for a replication service on one host: both nodes at 127.0.0.1,
    state in `state_dir` (tmp/<node> by default); `tls`: an object with ca, cert and key
    paths (the test PKI's files), or none (paths that are never opened)."""
    return parsed_cluster(
        tmp, node, state_dir=state_dir or tmp / node, site_key=tmp / "key",
        tls=Tls(tls.ca, tls.cert, tls.key) if tls else Tls(tmp / "ca", tmp / "crt", tmp / "k"),
        addresses=dict.fromkeys(NODES, "127.0.0.1"), api_socket=tmp / "s", modules_dir=tmp,
    )  # fmt: skip


def replication_module(tmp: Path, cluster: ClusterConfig) -> ModuleConfig:
    """Mirror module `demo` replicating tmp/app; no VIP and no scripts (a replication
    service uses neither)."""
    module = parsed_module(tmp, module_data("demo", replicated_dirs=[tmp / "app"]), cluster)
    return dataclasses.replace(module, vip=None, scripts=ScriptsSpec())


def write_scripts(
    base: Path, body: str, names: tuple[str, ...] = ("start_prim", "stop_prim")
) -> dict[str, Path]:
    """Executable shell scripts `base/<name>` running `body`: {name: path}."""
    base.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        script = base / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
        paths[name] = script
    return paths


def write_key(path: Path, key: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key)
    path.chmod(0o600)
    return path


def write_site(
    base: Path,
    node: str,
    *,
    heartbeat_port: int,
    site_key: Path,
    tls: Tls,
    module: dict[str, Any],
    **cluster: Any,
) -> Path:
    """cluster.yml of `node` in `base` (API socket, state and modules there) and its one
    module file; `cluster` adds top-level keys (console ...). Returns cluster.yml."""
    (base / "modules").mkdir(parents=True, exist_ok=True)
    data = cluster_data(
        node,
        state_dir=base / "state",
        site_key=site_key,
        tls=tls,
        heartbeat_port=heartbeat_port,
        api_socket=base / "api.sock",
        modules_dir=base / "modules",
        **cluster,
    )
    (base / "cluster.yml").write_text(_yaml(_strings(data)))
    (base / "modules" / f"{module['name']}.yml").write_text(_yaml(module))
    return base / "cluster.yml"


def _yaml(data: dict[str, Any]) -> str:
    # Leaf mappings in flow style, one a line, as the docs write them (`vip: {address: ...}`).
    return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=1 << 16))


def prim_scripts(paths: Mapping[str, Path], timeout_s: int = 5) -> dict[str, Any]:
    """The scripts section of a mirror module from `write_scripts` paths."""
    return {
        "start_prim": paths["start_prim"],
        "stop_prim": paths["stop_prim"],
        "timeout_s": timeout_s,
    }


class FakeVip:
    """The VIP is the one part faked (no root, no interface): who holds it is recorded in
    `holders`, shared by the daemons of one test, and two holders at once fail the test."""

    def __init__(self, node: str, holders: dict[str, str]) -> None:
        self.node, self.holders = node, holders

    async def add(self, m: Any) -> None:
        other = self.holders.get(m.name)
        assert other in (None, self.node), f"VIP of {m.name} already held by {other}"
        self.holders[m.name] = self.node

    async def remove(self, m: Any) -> None:
        if self.holders.get(m.name) == self.node:
            del self.holders[m.name]

    def held(self, m: Any) -> bool | None:
        return self.holders.get(m.name) == self.node


def pair_daemons(
    sites: tuple[Path | Any, Path | Any], key: bytes, holders: dict[str, str], **kw: Any
) -> tuple[NodeDaemon, NodeDaemon]:
    """node1's and node2's daemons from their sites (a cluster.yml path or a loaded site),
    the VIP faked and recorded in `holders`, no metrics listener; `kw` to NodeDaemon."""
    d1, d2 = (
        NodeDaemon(
            load_site(site) if isinstance(site, Path) else site,
            key,
            vip_ops=FakeVip(node, holders),
            metrics=False,
            **kw,
        )
        for node, site in zip(NODES, sites, strict=True)
    )
    return d1, d2


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port free on `host` now: UDP (heartbeats) unless `kind` says otherwise."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (replication links, consoles)."""
    return free_port(socket.SOCK_STREAM, host)


async def wait(pred: Callable[[], object], timeout: float = 10, what: str = "") -> None:
    """Poll `pred` every 20 ms until true; after `timeout` seconds the test fails, saying
    `what` it waited for."""
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"not within {timeout} s: {what or pred}")
