"""Coverage-guided fuzzing of the heartbeat decoder, the receiver's accounting and the farm
ARP parser: `python tests/fuzz/fuzz_packet.py -runs=N` (libFuzzer flags, via atheris)."""

from __future__ import annotations

import hashlib
import hmac
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["ha_runtime"]):
    # packet first: imported indirectly (via farm/heartbeat) it is not instrumented
    from ha_runtime.farm import arp
    from ha_runtime.generation import Generation
    from ha_runtime.heartbeat import packet
    from ha_runtime.heartbeat.peers import LocalAnnounce, ModuleStream
    from ha_runtime.heartbeat.service import HeartbeatService
    from ha_runtime.states import Flag, State

KEY = b"k" * 48
# run() is never called, so state_dir is never written; loading a missing one is empty.
SVC = HeartbeatService(
    node="node1", key=KEY, port=0, bind={}, peers={"node2": {"lan": "127.0.0.2"}},
    state_dir=Path("/nonexistent/hapair-fuzz"),
    streams={"m": ModuleStream("m", ("node2",), 0.1, 1.0)},
    announce=lambda m: LocalAnnounce(State.SECOND, Flag.NONE, Generation(5)),
)  # fmt: skip


def test_one_input(data: bytes) -> None:
    # Half the inputs are signed with the key: the attacker holds it, the fields still lie.
    signed = data[:1] == b"\x01"
    pkt = b"HAPH\x01" + data[1:] + hmac.new(KEY, b"HAPH\x01" + data[1:], hashlib.sha256).digest()
    before = sum(SVC.drops.values()) + sum(SVC.received.values())
    result = SVC.handle_datagram("lan", pkt if signed else data)
    assert sum(SVC.drops.values()) + sum(SVC.received.values()) == before + 1  # counted once
    if isinstance(result, packet.Heartbeat):
        assert packet.encode(result, KEY) == pkt
    else:
        assert isinstance(result, packet.Drop)
    assert isinstance(packet.decode(data, KEY), packet.Drop | packet.Heartbeat)
    p = arp.parse(data)
    assert p is None or data[12:14] == b"\x08\x06"


if __name__ == "__main__":
    atheris.instrument_all()  # instrument_imports misses some modules here (cov stayed flat)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
