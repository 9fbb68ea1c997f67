"""Two real node daemons with their web consoles on loopback, and an HTTPS client.

The daemons run in the test's trio loop (the main thread: they install signal handlers);
the scenario runs in a worker thread and talks HTTPS to the consoles like a browser."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import trio

from ha_runtime.console.auth import make_hash
from ha_runtime.daemon import NodeDaemon
from ha_runtime.replication.child import mounted
from ha_runtime.states import State
from tests.sitefactory import free_port, free_tcp_port, pair_daemons, wait

from .pki import make_cert
from .site import pair_site

PASSWORDS = {"ops": "correct horse battery", "viewer": "look but do not touch"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str
    cookies: list[str] = field(default_factory=list)


@dataclass
class Pair:
    tmp: Path
    d1: NodeDaemon
    d2: NodeDaemon
    holders: dict[str, str]
    urls: dict[str, str]  # node -> "127.0.0.x:port"

    @property
    def ca(self) -> Path:
        return self.tmp / "pki" / "ca.crt"

    def client_cert(self, cn: str) -> tuple[Path, Path]:
        crt = self.tmp / "pki" / f"{cn}.crt"
        if not crt.exists():
            make_cert(self.tmp / "pki", (self.ca, self.tmp / "pki" / "ca.key"), cn)
        return crt, self.tmp / "pki" / f"{cn}.key"

    def request(
        self,
        method: str,
        path: str,
        *,
        node: str = "node1",
        cookie: str | None = None,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        cert: str | None = None,
        raw_body: bytes | None = None,
    ) -> Reply:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.check_hostname = False  # the test certificates name the nodes, not 127.0.0.x
        if cert is not None:
            crt, key = self.client_cert(cert)
            ctx.load_cert_chain(str(crt), str(key))
        host, _, port = self.urls[node].rpartition(":")
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
        hdrs = dict(headers or {})
        if cookie:
            hdrs["Cookie"] = cookie
        body = raw_body
        if form is not None:
            body = urlencode(form).encode()
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
        try:
            conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            return Reply(
                r.status,
                {k.lower(): v for k, v in r.getheaders()},
                r.read().decode(),
                [v for k, v in r.getheaders() if k.lower() == "set-cookie"],
            )
        finally:
            conn.close()

    def login(self, user: str, node: str = "node1") -> str:
        r = self.request("POST", "/login", node=node,
                         form={"user": user, "password": PASSWORDS[user]})  # fmt: skip
        assert r.status == 303, (r.status, r.body[:300])
        return r.cookies[0].split(";")[0]

    def csrf(self, cookie: str, node: str = "node1") -> str:
        page = self.request("GET", "/", node=node, cookie=cookie).body
        marker = 'name=csrf value="'
        start = page.index(marker) + len(marker)
        return page[start : page.index('"', start)]

    def events(self, node: str = "node1") -> list[dict[str, object]]:
        d = self.d1 if node == "node1" else self.d2
        return d.events.read()


def console_yaml(address: str, peer: str, peer_address: str) -> str:
    ops = make_hash(PASSWORDS["ops"], log2n=12)
    viewer = make_hash(PASSWORDS["viewer"], log2n=12)
    return f"""console:
  address: "{address}"
  peers: {{{peer}: "{peer_address}"}}
  users:
    - {{name: ops, role: operator, password_hash: "{ops}"}}
    - {{name: viewer, role: viewer, password_hash: "{viewer}"}}
    - {{name: alice, role: operator, certificate: true}}
"""


def run_pair(tmp: Path, scenario: Callable[[Pair], None], *, replicated: bool = False) -> Pair:
    """Start both daemons (console on each), wait for PRIM/SECOND, run `scenario` in a
    thread, stop everything. Returns the pair (for its events)."""
    hb = free_port(socket.SOCK_DGRAM)
    repl = free_tcp_port() if replicated else 0
    urls = {
        "node1": f"127.0.0.1:{free_tcp_port()}",
        "node2": f"127.0.0.2:{free_tcp_port('127.0.0.2')}",
    }
    holders: dict[str, str] = {}
    sites = tuple(
        pair_site(
            tmp, node, hb, replicated=repl, console=console_yaml(urls[node], peer, urls[peer])
        )
        for node, peer in (("node1", "node2"), ("node2", "node1"))
    )
    pair = Pair(tmp, *pair_daemons((sites[0], sites[1]), b"m" * 48, holders), holders, urls)

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(pair.d1.run)
            n.start_soon(pair.d2.run)
            m1, m2 = pair.d1.modules["flightdata"], pair.d2.modules["flightdata"]
            await wait(
                lambda: (
                    m1.state is State.PRIM
                    and m2.state is State.SECOND
                    and m2.status()["sync"] == "in-sync"
                ),
                30,
            )
            await wait(lambda: holders.get("flightdata") == "node1")
            await wait(lambda: all(d.console and d.console.port for d in (pair.d1, pair.d2)))
            await trio.to_thread.run_sync(scenario, pair)
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for node in ("node1", "node2"):
            app = tmp / node / "app"
            if replicated and mounted(app):
                subprocess.run(["umount", "-l", str(app)], check=False)
    return pair
