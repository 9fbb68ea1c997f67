"""Crash the module's primary node while a client probes the VIP, then boot it again.

Run by side_effect.yml on the controller (root, the lab up, the site deployed). Prints
one JSON object: which node was primary, how long after the crash the survivor first
answered through the VIP, and what the client saw while the crashed node came back.
The playbook asserts on it; keeping the timing here (one clock, CLOCK_MONOTONIC, shared
with the probe in the client namespace) is what makes the measurement honest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ha_lab.lab import Lab
from ha_lab.observe import Probe, longest_outage, states_of, wait_for_states


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--module", default="flightdata")
    parser.add_argument("--vip", default="10.77.0.100")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--wait", type=float, default=30.0, help="give up on the survivor after")
    args = parser.parse_args()

    lab = Lab()
    before = states_of(args.module)
    prims = [n for n, s in before.items() if s == "PRIM"]
    seconds = [n for n, s in before.items() if s == "SECOND"]
    if len(prims) != 1 or len(seconds) != 1:
        print(json.dumps({"error": f"not PRIM/SECOND before the crash: {before}"}))
        return 1
    primary, survivor = prims[0], seconds[0]
    result: dict[str, object] = {"primary": primary, "survivor": survivor, "before": before}

    probe = Probe(args.vip, port=args.port, duration=600).start()
    try:
        if probe.wait_served_by(primary, after=time.monotonic(), timeout=10) is None:
            result["error"] = f"{primary} does not answer through the VIP"
            return 1
        crashed_at = time.monotonic()
        lab.crash(primary)
        # Requests started while the crash was under way may still be answered by it.
        result["crash_took_s"] = round(time.monotonic() - crashed_at, 3)
        served = probe.wait_served_by(survivor, after=crashed_at, timeout=args.wait)
        result["failover_s"] = None if served is None else round(served - crashed_at, 3)
        if served is None:
            result["error"] = f"{survivor} did not answer through the VIP within {args.wait} s"
            return 1

        booted_at = time.monotonic()
        lab.boot(primary)
        result["boot_s"] = round(time.monotonic() - booted_at, 1)
        after = wait_for_states(args.module, {primary: "SECOND", survivor: "PRIM"}, timeout=120)
        result["after"] = after
        time.sleep(2)  # the client keeps probing once the pair is back together
        end = time.monotonic()
        samples = probe.snapshot()
        # Once the survivor answered, the crashed node (booted again) must never answer.
        result["answers_from_crashed_node_after_failover"] = sum(
            1 for s in samples if s.t >= served and s.node == primary
        )
        result["answers_from_survivor_after_failover"] = sum(
            1 for s in samples if s.t >= served and s.node == survivor
        )
        # While the crashed node boots and rejoins, the survivor must keep serving.
        result["longest_outage_during_rejoin_s"] = round(longest_outage(samples, served, end), 3)
    finally:
        probe.stop()
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
