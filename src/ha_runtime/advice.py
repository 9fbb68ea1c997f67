"""What an abnormal status means and what to type next, for `hactl status` and the console.

Input: one module entry of the daemon's status (``MirrorModule.status()`` or the farm's).
Each piece of advice names the situation in plain words and gives the next command; none
is given for a healthy module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Advice:
    what: str  # the situation, in plain words
    next: str  # the command or check to do next


def module_advice(m: dict[str, Any]) -> list[Advice]:
    name, node, peer = m.get("module", "?"), m.get("node", "?"), m.get("peer", "?")
    state, peer_state = str(m.get("state")), str(m.get("peer_state"))
    out: list[Advice] = []

    def add(what: str, nxt: str) -> None:
        out.append(Advice(what, nxt))

    if state == "STOP":
        add(
            f"{name} is stopped on {node} by an operator (it stays stopped across reboots)",
            f"hactl start {name}",
        )
    if m.get("data") == "diverged":
        add(
            f"SPLIT BRAIN: the copies of {name} on {node} and {peer} both changed apart;"
            " no node takes the role on its own",
            f"choose the copy to keep (docs/replication.md), then on that node: hactl prim {name};"
            f" on the other: hactl second {name}",
        )
    elif state == "WAIT" and m.get("data") == "peer newer" and peer_state in ("LOST", "UNKNOWN"):
        add(
            f"{name} waits on {node}: {peer} has newer data and cannot be heard; starting here"
            " would lose what only it has",
            f"bring {peer} back (power, network, `systemctl status hapair` there); if it is gone"
            f" for good and its newer data may be lost: hactl prim {name}",
        )
    elif state == "WAIT" and peer_state in ("LOST", "UNKNOWN"):
        add(
            f"{name} waits on {node}: {peer} cannot be heard and this node will not serve alone"
            f" ({m.get('reason')})",
            f"check {peer} (power, network, hapair.service); if it is down for sure:"
            f" hactl prim {name}",
        )
    elif state == "WAIT":
        add(f"{name} waits on {node}: {m.get('reason')}", f"hactl events {name}")
    if m.get("blocked"):
        add(
            f"{node} is held out of {name} by failing checkers: {m['blocked']}",
            f"fix what the checker tests; it rejoins by itself (details: hactl events {name})",
        )
    if m.get("yielding"):
        add(
            f"{node} gave up {name}: {m['yielding']}",
            f"fix the cause, then: hactl start {name}",
        )
    for c in m.get("checkers") or []:
        if c.get("ok") is False and not m.get("blocked"):
            add(
                f"checker {c.get('name')} of {name} fails: {c.get('detail')}",
                f"look at the application on {node}; history: hactl events {name}",
            )
    if state in ("ALONE", "UP") and peer_state in ("LOST", "UNKNOWN", "STOP"):
        add(
            f"{name} runs on {node} without {peer} ({peer_state}): no redundancy",
            f"bring {peer} back (`hactl status` there; `hactl start {name}` if it was stopped);"
            " a resync follows by itself",
        )
    if m.get("witness_ok") is False:
        add(
            f"the witness of {name} does not answer from {node}: it may be cut off",
            "check this node's network (the witness addresses in the module file)",
        )
    alive = set(m.get("peer_networks") or []) if isinstance(m.get("peer_networks"), list) else None
    if alive is not None and m.get("peer_alive") and m.get("networks"):
        down = sorted(set(m["networks"]) - alive)
        if down:
            add(
                f"heartbeats from {peer} lost on network(s) {', '.join(down)} (others still up)",
                "check those links and interfaces on both nodes",
            )
    out += _replication_advice(m)
    if m.get("drained"):
        add(f"{name} is drained on {node}: it takes no new connection", f"hactl undrain {name}")
    return out


def _replication_advice(m: dict[str, Any]) -> list[Advice]:
    r = m.get("replication")
    if not isinstance(r, dict):
        return []
    name, peer = m.get("module", "?"), m.get("peer", "?")
    out: list[Advice] = []
    if r.get("quarantine"):
        out.append(
            Advice(
                f"split-brain quarantine kept: {', '.join(r['quarantine'])} (files of this copy"
                " that the other copy overwrote)",
                "review and merge those files by hand, then remove the directories",
            )
        )
    rs = r.get("resync")
    if isinstance(rs, dict):
        eta = rs.get("eta_s")
        out.append(
            Advice(
                f"resync of {name} to {peer} running ({rs.get('kind')}); until it ends a"
                " switchover is refused and a failover would lose data",
                "wait (ETA " + ("unknown" if eta is None else f"{float(eta):.0f} s") + f");"
                f" watch: hactl status {name}",
            )
        )
    elif r.get("role") == "primary" and not r.get("in_sync") and m.get("peer_alive"):
        errors = [d.get("last_error") for d in r.get("dirs", []) if d.get("last_error")]
        out.append(
            Advice(
                f"{name} is not replicating to {peer} although it is heard"
                + (f" (last error: {errors[0]})" if errors else ""),
                f"hactl resync {name} (events: hactl events {name})",
            )
        )
    return out


def format_advice(result: dict[str, Any]) -> list[str]:
    """Lines for `hactl status`: empty when every module is healthy."""
    lines: list[str] = []
    for m in result.get("modules", []):
        for a in module_advice({**m, "networks": result.get("networks")}):
            lines += [f"  ! {a.what}", f"    next: {a.next}"]
    return ["", "attention:", *lines] if lines else []
