"""The farm acceptance run: share, crash, return, as a client in the lab sees them.

Run by side_effect.yml on the controller (root, the lab up, the site deployed). Prints one
JSON object; the playbook asserts on it. Steps:

1. `spread`: 200 requests through the VIP, each on a new connection (a new source port),
   and who answered them;
2. crash the last node (`ha-lab crash`, a power cut) while a probe opens a new connection
   every 20 ms: `recovery_s` is the time from the crash to the first request after which
   every request succeeded (observed for `--observe` seconds), and who answered after it;
   then 200 more requests, all on the survivors;
3. hold 20 keep-alive connections (all on the survivors, the node is down), boot the node,
   wait until it is UP again: every request on those connections must succeed throughout;
4. `spread` again: the returned node has its share back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ha_lab.farm_client import HeldConnections, recovery, spread
from ha_lab.lab import Lab
from ha_lab.observe import Probe, states_of, wait_for_states


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--module", default="weather")
    parser.add_argument("--vip", default="10.77.0.200")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--observe", type=float, default=6.0, help="seconds watched after a crash")
    parser.add_argument("--victim", default=None, help="node to crash (default: the last one)")
    args = parser.parse_args()

    lab = Lab()
    result: dict[str, object] = {}
    before = states_of(args.module)
    result["before"] = before
    nodes = sorted(before)
    if len(nodes) < 2 or set(before.values()) != {"UP"}:
        result["error"] = f"{args.module} is not UP on every node: {before}"
        print(json.dumps(result, sort_keys=True))
        return 1
    victim = args.victim or nodes[-1]
    result.update(victim=victim, survivors=[n for n in nodes if n != victim])

    result["spread_before"] = spread(args.vip, args.port, count=args.requests)
    ok = False
    try:
        ok = crash_and_return(lab, args, victim, nodes, result)
    finally:
        print(json.dumps(result, sort_keys=True))
    return 0 if ok else 1


def crash_and_return(
    lab: Lab, args: argparse.Namespace, victim: str, nodes: list[str], result: dict[str, object]
) -> bool:
    probe = Probe(args.vip, port=args.port, path="/", duration=600).start()
    held: HeldConnections | None = None
    try:
        if probe.wait_served_by(victim, after=time.monotonic(), timeout=10) is None:
            result["error"] = f"the probe never reached {victim} through the VIP"
            return False
        crashed_at = time.monotonic()  # measured from the start of the power cut
        lab.crash(victim)
        gone_at = time.monotonic()  # no answer can come from the victim after this
        time.sleep(args.observe)
        end = time.monotonic()
        recovered, after_nodes = recovery(probe.snapshot(), crashed_at, end)
        result["recovery_s"] = None if recovered is None else round(recovered - crashed_at, 3)
        result["answered_after_recovery_by"] = sorted(after_nodes)
        result["answers_from_victim_after_crash"] = sum(
            1 for s in probe.snapshot() if s.t >= gone_at and s.node == victim
        )
        result["spread_crashed"] = spread(args.vip, args.port, count=args.requests)

        held = HeldConnections(args.vip, port=args.port, connections=20, interval=0.1).start()
        if not held.wait_rounds(3):
            result["error"] = "the held connections did not start"
            return False
        booted_at = time.monotonic()
        lab.boot(victim)
        after = wait_for_states(args.module, dict.fromkeys(nodes, "UP"), timeout=120)
        result["after"] = after
        result["rejoin_s"] = round(time.monotonic() - booted_at, 1)
        time.sleep(3)  # the held connections keep going once the node serves again
        requests = held.stop()
        during = [r for r in requests if r.t >= booted_at]
        result["held_requests_during_return"] = len(during)
        result["held_failures_during_return"] = sum(1 for r in during if r.node is None)
        result["held_failures_total"] = sum(1 for r in requests if r.node is None)
        result["held_answered_by"] = sorted({r.node for r in requests if r.node})
        result["spread_after"] = spread(args.vip, args.port, count=args.requests)
    finally:
        probe.stop()
        if held is not None:
            held.stop()
    return True


if __name__ == "__main__":
    sys.exit(main())
