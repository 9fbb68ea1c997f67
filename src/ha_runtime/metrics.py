"""Prometheus metrics on the management address (state per module, drops, transitions)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from ha_runtime.packet import Drop
from ha_runtime.states import State


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.state = Gauge(
            "hapair_module_state",
            "1 for the module's current state on this node, 0 for the others",
            ["module", "state"],
            registry=self.registry,
        )
        self.peer_alive = Gauge(
            "hapair_peer_alive",
            "1 while the peer's heartbeats arrive",
            ["module"],
            registry=self.registry,
        )
        self.drops = Counter(
            "hapair_heartbeat_dropped",
            "Heartbeat datagrams dropped, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.transitions = Counter(
            "hapair_transitions",
            "State transitions of each module on this node",
            ["module", "from_state", "to_state"],
            registry=self.registry,
        )
        for reason in Drop:
            self.drops.labels(reason.value)

    def set_state(self, module: str, state: State) -> None:
        for s in State:
            self.state.labels(module, s.name).set(1 if s is state else 0)

    def on_drop(self, reason: Drop) -> None:
        self.drops.labels(reason.value).inc()

    def on_transition(self, module: str, old: State, new: State) -> None:
        self.transitions.labels(module, old.name, new.name).inc()
        self.set_state(module, new)

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host, registry=self.registry)
