"""The nemesis: a seeded random schedule of faults and operator steps on the lab.

The schedule is drawn from `random.Random(seed)`: a deck of every fault kind and operator
step, shuffled afresh each time it is used up, so every kind comes up once per deck; the
target (the mirror module's primary or secondary as found at that moment, or a node), the
hold time and the fault's parameters are drawn from the same generator. Faults are
injected one at a time, each held then healed; after each heal the nemesis waits (bounded)
for the site to converge (flightdata PRIM/SECOND in sync, weather UP/UP) and logs how
long that took. Operator steps are the operators' own playbooks, run through
ansible-runner; a switchover or failback is sometimes run under a mild fault (CPU
saturation or 5 % loss on a node).

Every inject and heal goes to the fault log with its CLOCK_MONOTONIC time.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from observers import NODES
from playrunner import PlayRun, run_playbook

from ha_lab import nemesis_faults
from ha_lab.lab import Lab
from ha_lab.node import Node
from ha_lab.observe import module_states

MIRROR = "flightdata"
FARM = "weather"
APP_DIR = "/var/lib/flightdata"
# On the file system of the replicated copies (/var/lib/hapair/replica/... on the node's
# root file system) but outside them: a fill there is not replicated.
FILL_DIR = "/var/tmp"

FAULTS = (
    "crash", "cut_hb", "cut_lan", "cut_all", "loss", "kill_runtime", "kill_app", "fill", "cpu",
)  # fmt: skip
STEPS = ("switchover", "failback", "verify_resync")
# What may make the mirror module change primary; the others (CPU saturation, packet loss,
# the heartbeat link alone) must not: heartbeats run on hb and lan, and detection needs
# both silent for the timeout.
JUSTIFY_FAILOVER = frozenset(
    {"crash", "cut_all", "cut_lan", "kill_runtime", "kill_app", "fill", "switchover", "failback"}
)


@dataclass
class Fault:
    kind: str
    target: str | None
    role: str | None
    params: dict[str, Any]
    t_inject: float
    t_heal: float | None = None
    recovered_s: float | None = None  # heal -> converged (None: not within the bound)
    note: str = ""
    play: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    def line(self, t0: float) -> str:
        heal = f"{self.t_heal - t0:7.1f}" if self.t_heal is not None else "      -"
        rec = f"{self.recovered_s:.1f}s" if self.recovered_s is not None else "-"
        where = f"{self.target}({self.role})" if self.target else "-"
        txt = f"t+{self.t_inject - t0:7.1f} heal t+{heal} {self.kind:<13} {where:<18} "
        txt += f"{self.params} converged {rec}"
        if self.note:
            txt += f" [{self.note}]"
        if self.problems:
            txt += f" PROBLEMS {self.problems}"
        return txt


def running(node: str) -> bool:
    return Node(node).init_pid() is not None


def site_status() -> dict[str, dict[str, dict[str, Any]]]:
    return {n: module_states(n) if running(n) else {} for n in NODES}


def converged(st: dict[str, dict[str, dict[str, Any]]]) -> bool:
    mirror = {n: st[n].get(MIRROR, {}) for n in NODES}
    states = sorted(str(m.get("state")) for m in mirror.values())
    if states != ["PRIM", "SECOND"]:
        return False
    second = next(m for m in mirror.values() if m.get("state") == "SECOND")
    if second.get("sync") != "in-sync":
        return False
    return all(st[n].get(FARM, {}).get("state") == "UP" for n in NODES)


def primary(st: dict[str, dict[str, dict[str, Any]]]) -> str | None:
    prims = [n for n in NODES if st[n].get(MIRROR, {}).get("state") in ("PRIM", "ALONE")]
    return prims[0] if len(prims) == 1 else None


def wait_converged(timeout: float) -> float | None:
    """Seconds until the site converged, None if not within timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if converged(site_status()):
            return time.monotonic() - started
        time.sleep(1.0)
    return None


class Nemesis:
    def __init__(
        self,
        lab: Lab,
        seed: int,
        log: Callable[[str], None] = print,
        settle: float = 120.0,
        steps: bool = True,
    ) -> None:
        self.lab = lab
        self.seed = seed
        self.rng = random.Random(seed)
        self.log_fn = log
        self.settle = settle
        self.kinds = FAULTS + (STEPS if steps else ())
        self.deck: list[str] = []
        self.faults: list[Fault] = []
        self.plays: list[PlayRun] = []
        self.t0 = time.monotonic()
        self.cpus = os.cpu_count() or 2

    # ------------------------------------------------------------------ schedule

    def next_kind(self) -> str:
        if not self.deck:
            self.deck = list(self.kinds)
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    def run(self, until: float, limit: int | None = None) -> None:
        """Faults and steps until monotonic time `until` (the one under way finishes), or
        `limit` of them."""
        while time.monotonic() < until and (limit is None or len(self.faults) < limit):
            kind = self.next_kind()
            self.once(kind)
            time.sleep(self.rng.uniform(0.5, 3.0))

    def log(self, msg: str) -> None:
        self.log_fn(f"[nemesis seed={self.seed} t+{time.monotonic() - self.t0:.1f}] {msg}")

    def _target(self, st: dict[str, dict[str, dict[str, Any]]]) -> tuple[str, str]:
        role = self.rng.choice(["primary", "secondary"])
        prim = primary(st)
        if prim is None:
            return self.rng.choice(NODES), "unknown"
        return (prim if role == "primary" else next(n for n in NODES if n != prim)), role

    def once(self, kind: str) -> Fault:
        st = site_status()
        node, role = self._target(st)
        hold = self.rng.uniform(3.0, 10.0)
        fault = Fault(kind, node, role, {}, time.monotonic())
        if kind in STEPS:
            fault.target, fault.role = None, None
        self.faults.append(fault)
        self.log(f"inject {kind} on {fault.target} ({fault.role})")
        try:
            getattr(self, f"_do_{kind}")(fault, hold)
        except Exception as exc:
            fault.problems.append(f"nemesis error: {type(exc).__name__}: {exc}")
            self.log(f"{kind}: nemesis error {exc}")
            self.heal_all()
        if fault.t_heal is None:
            fault.t_heal = time.monotonic()
        fault.recovered_s = wait_converged(self.settle)
        self.log(f"healed {kind}: {fault.line(self.t0)}")
        return fault

    # ------------------------------------------------------------------ faults

    def _hold_then(self, fault: Fault, hold: float, heal: Callable[[], None]) -> None:
        fault.params["hold_s"] = round(hold, 1)
        time.sleep(hold)
        heal()
        fault.t_heal = time.monotonic()

    def _do_crash(self, fault: Fault, hold: float) -> None:
        assert fault.target is not None
        node = fault.target
        self.lab.crash(node)
        self._hold_then(fault, hold, lambda: self.lab.boot(node))

    def _cut(self, fault: Fault, hold: float, net: str) -> None:
        assert fault.target is not None
        node = fault.target
        self.lab.cut(node, net)
        self._hold_then(fault, hold, lambda: self.lab.restore(node))

    def _do_cut_hb(self, fault: Fault, hold: float) -> None:
        self._cut(fault, hold, "hb")

    def _do_cut_lan(self, fault: Fault, hold: float) -> None:
        self._cut(fault, hold, "lan")

    def _do_cut_all(self, fault: Fault, hold: float) -> None:
        self._cut(fault, hold, "all")

    def _do_loss(self, fault: Fault, hold: float) -> None:
        assert fault.target is not None
        node = fault.target
        percent = self.rng.randint(5, 30)
        net = self.rng.choice(["all", "hb", "lan"])
        fault.params.update(percent=percent, net=net)
        self.lab.loss(node, percent, net)
        self._hold_then(fault, hold, lambda: self.lab.restore(node))

    def _do_kill_runtime(self, fault: Fault, hold: float) -> None:
        assert fault.target is not None
        nemesis_faults.kill_runtime(self.lab, fault.target)
        fault.t_heal = time.monotonic()
        # systemd restarts it (Restart=on-failure); started by hand after 30 s otherwise.
        waited = nemesis_faults.heal_runtime(self.lab, fault.target)
        fault.params["restarted_after_s"] = round(waited, 1)

    def _do_kill_app(self, fault: Fault, hold: float) -> None:
        app = self.rng.choice([MIRROR, FARM])
        if app == FARM:
            fault.target, fault.role = self.rng.choice(NODES), "farm member"
        elif fault.role == "secondary":  # the mirror application runs on the primary only
            prim = primary(site_status())
            fault.target, fault.role = prim or fault.target, "primary"
        assert fault.target is not None
        fault.params["app"] = app
        node = fault.target
        nemesis_faults.kill_unit_main(self.lab, node, f"{app}.service")
        if app == MIRROR:
            # No heal: hapair's checker (action restart) restarts it, or fails the module over.
            fault.t_heal = time.monotonic()
            return

        def heal() -> None:
            # The site's weather checker has action `wait`: hapair gives the node's buckets
            # away but does not restart the application; the operator does.
            if not nemesis_faults.unit_active(self.lab, node, f"{app}.service"):
                fault.note = "operator restarted weather (checker action wait)"
                nemesis_faults.start_unit(self.lab, node, f"{app}.service")

        self._hold_then(fault, hold, heal)

    def _do_fill(self, fault: Fault, hold: float) -> None:
        """The file system holding the replicated copy full, on the primary or the secondary.

        Filled beside the copy (FILL_DIR, same file system as the FUSE mount's backing
        directory), with fallocate: instant. Filling through the FUSE mount writes the
        whole disk through synchronous replication (7.8 GB: 3-4 minutes in the lab)."""
        assert fault.target is not None
        node = fault.target
        started = time.monotonic()
        self.lab.fill(node, FILL_DIR)
        fault.params["fill_s"] = round(time.monotonic() - started, 1)
        self._hold_then(fault, hold, lambda: nemesis_faults.unfill(self.lab, node, FILL_DIR))

    def _do_cpu(self, fault: Fault, hold: float) -> None:
        assert fault.target is not None
        node = fault.target
        fault.params["workers"] = self.cpus
        nemesis_faults.cpu_burn(self.lab, node, self.cpus)
        self._hold_then(fault, hold, lambda: nemesis_faults.cpu_stop(self.lab, node))

    # ------------------------------------------------------------------ operator steps

    def _play(self, fault: Fault, playbook: str, extravars: dict[str, Any]) -> None:
        background: tuple[str, str] | None = None
        if fault.kind in ("switchover", "failback") and self.rng.random() < 0.5:
            node = self.rng.choice(NODES)
            how = self.rng.choice(["cpu", "loss5"])
            background = (how, node)
            fault.params["under"] = f"{how} on {node}"
            if how == "cpu":
                nemesis_faults.cpu_burn(self.lab, node, self.cpus)
            else:
                self.lab.loss(node, 5, "all")
        try:
            result = run_playbook(playbook, extravars)
        finally:
            if background is not None:
                how, node = background
                if how == "cpu":
                    nemesis_faults.cpu_stop(self.lab, node)
                else:
                    self.lab.restore(node)
        fault.t_heal = time.monotonic()
        self.plays.append(result)
        fault.play = result.brief()
        crashed = {n for n in NODES if not running(n)}
        fault.problems += result.problems(crashed)

    def _ready_for_step(self, fault: Fault) -> bool:
        waited = wait_converged(self.settle)
        if waited is None:
            fault.note = f"site not converged within {self.settle:.0f} s: step skipped"
            fault.problems.append(fault.note)
            return False
        return True

    def _do_switchover(self, fault: Fault, hold: float) -> None:
        if self._ready_for_step(fault):
            self._play(fault, "playbooks/switchover.yml", {"module": MIRROR})

    def _do_failback(self, fault: Fault, hold: float) -> None:
        if self._ready_for_step(fault):
            self._play(fault, "playbooks/failback.yml", {"module": MIRROR, "failback_wait": 120})

    def _do_verify_resync(self, fault: Fault, hold: float) -> None:
        self._play(
            fault, "playbooks/verify_resync.yml", {"module": MIRROR, "verify_resync_wait": 120}
        )

    # ------------------------------------------------------------------ healing

    def heal_all(self) -> None:
        """Every node booted, no link fault, no CPU burner (idempotent)."""
        for node in NODES:
            if not running(node):
                self.lab.boot(node)
            self.lab.restore(node)
            nemesis_faults.cpu_stop(self.lab, node)
            nemesis_faults.unfill(self.lab, node, FILL_DIR)  # rm -f: idempotent
