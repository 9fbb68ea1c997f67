"""Checkers: is the application (or what it needs) healthy on this node?

Each probe returns (ok, detail) and never raises; a probe that overruns its timeout fails.
The restart policy and the start grace are small pure classes, tested directly.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
from collections import deque
from pathlib import Path

import trio

from ha_runtime.config import CheckerSpec
from ha_runtime.scripts import SCRIPT_PATH

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0


class RestartBudget:
    """At most `max_restarts` local restarts in a sliding window, then failover."""

    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._times: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()

    def try_restart(self, now: float) -> bool:
        """Consume one restart if the budget allows it."""
        self._trim(now)
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    def used(self, now: float) -> int:
        self._trim(now)
        return len(self._times)

    def exhausted(self, now: float) -> bool:
        return self.used(now) >= self.max_restarts


class StartGrace:
    """An application that is still starting is not failing.

    An app-level checker's failures count only once the application has passed that
    checker since its start script returned, or `start_grace_s` after that. Before, a
    checker probing an application that a loaded node was still starting (the Python
    interpreter, its database opened through the replicated mount) restarted it, and the
    restart began the wait again. Until the start script has returned in this primary
    term (the replicator and the VIP come first), the application is starting."""

    def __init__(self) -> None:
        self.started_at: float | None = None
        self._passed: set[str] = set()

    def started(self, now: float) -> None:
        """The start script returned (a promotion, a local restart)."""
        self.started_at = now
        self._passed.clear()

    def stopped(self) -> None:
        """The stop script is run: the next start begins a new grace."""
        self.started_at = None
        self._passed.clear()

    def passed(self, checker: str) -> None:
        self._passed.add(checker)

    def holds(self, spec: CheckerSpec, now: float) -> bool:
        """A failure of `spec` now does not count."""
        if spec.name in self._passed:
            return False
        return self.started_at is None or now - self.started_at < spec.start_grace_s


async def probe(spec: CheckerSpec) -> tuple[bool, str]:
    with trio.move_on_after(spec.timeout_s):
        try:
            return await _PROBES[spec.type](spec)
        except OSError as exc:
            return False, f"{spec.type} probe error: {exc.strerror or exc}"
    return False, f"no answer within {spec.timeout_s:g}s"


async def _probe_process(spec: CheckerSpec) -> tuple[bool, str]:
    assert spec.process is not None
    found = await trio.to_thread.run_sync(process_running, spec.process)
    return found, f"process {spec.process} {'running' if found else 'not running'}"


def process_running(name: str, proc: Path = Path("/proc")) -> bool:
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == name:
                return True
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            if argv0 and os.path.basename(argv0) == name:
                return True
    return False


async def _probe_unit(spec: CheckerSpec) -> tuple[bool, str]:
    assert spec.unit is not None
    rc = await _run(["systemctl", "is-active", "--quiet", spec.unit])
    return rc == 0, f"unit {spec.unit} {'active' if rc == 0 else 'not active'}"


async def _probe_tcp(spec: CheckerSpec) -> tuple[bool, str]:
    stream = await trio.open_tcp_stream(spec.host, spec.port)
    await stream.aclose()
    return True, f"tcp {spec.host}:{spec.port} accepts connections"


async def _probe_command(spec: CheckerSpec) -> tuple[bool, str]:
    rc = await _run(list(spec.command))
    return rc == 0, f"command exited {rc}"


async def _probe_interface(spec: CheckerSpec) -> tuple[bool, str]:
    assert spec.interface is not None
    up, detail = interface_up(spec.interface)
    return up, detail


def interface_up(interface: str, sysfs: Path = Path("/sys/class/net")) -> tuple[bool, str]:
    base = sysfs / interface
    try:
        flags = int((base / "flags").read_text().strip(), 16)
        oper = (base / "operstate").read_text().strip()
    except OSError:
        return False, f"interface {interface} does not exist"
    # "unknown" is what virtual links without carrier reporting (veth in some states, lo) say.
    up = bool(flags & 0x1) and oper in ("up", "unknown")
    return up, f"interface {interface} is {'up' if up else 'down'} (operstate {oper})"


async def _probe_witness(spec: CheckerSpec) -> tuple[bool, str]:
    ok = await any_reachable(spec.addresses, spec.timeout_s)
    return ok, "a witness answers" if ok else f"no witness answers ({', '.join(spec.addresses)})"


async def _run(argv: list[str]) -> int:
    proc = await trio.lowlevel.open_process(
        argv,
        env={"PATH": SCRIPT_PATH, "LANG": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        return int(await proc.wait())
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)


_PROBES = {
    "process": _probe_process,
    "unit": _probe_unit,
    "tcp": _probe_tcp,
    "command": _probe_command,
    "interface": _probe_interface,
    "witness": _probe_witness,
}


# --------------------------------------------------------------------------- ICMP echo


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    payload = b"hapair-witness"
    head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    csum = _checksum(head + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload


async def ping(address: str, timeout_s: float) -> bool:
    """One ICMP echo. A datagram ICMP socket when allowed, else a raw one (root)."""
    try:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        raw = False
    except OSError:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        raw = True
    ident, seq = random.randrange(1, 0xFFFF), random.randrange(1, 0xFFFF)
    with sock, trio.move_on_after(timeout_s):
        await sock.sendto(echo_request(ident, seq), (address, 0))
        while True:
            data, src = await sock.recvfrom(1500)
            if raw:
                data = data[(data[0] & 0x0F) * 4 :]  # strip the IP header
            if len(data) < 8 or src[0] != address:
                continue
            typ, _code, _c, rid, rseq = struct.unpack("!BBHHH", data[:8])
            # Datagram sockets rewrite the id to the socket's own: match on seq then.
            if typ == ICMP_ECHO_REPLY and rseq == seq and (rid == ident or not raw):
                return True
    return False


async def any_reachable(addresses: tuple[str, ...], timeout_s: float, attempts: int = 1) -> bool:
    """Whether any address answers an ICMP echo within `timeout_s`.

    With several attempts, a new round of echoes leaves every timeout_s/attempts: under
    packet loss one lost echo must not make a reachable witness look gone.
    """
    found = False

    async def one(addr: str, cancel: trio.CancelScope) -> None:
        nonlocal found
        try:
            ok = await ping(addr, timeout_s)
        except OSError:
            ok = False
        if ok:
            found = True
            cancel.cancel()

    rounds = max(1, attempts)
    with trio.move_on_after(timeout_s):
        async with trio.open_nursery() as nursery:
            for _ in range(rounds):
                for a in addresses:
                    nursery.start_soon(one, a, nursery.cancel_scope)
                await trio.sleep(timeout_s / rounds)
    return found
