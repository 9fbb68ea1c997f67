"""Crash one node of a mirror module while a client writes, boot it, wait for the resync.

Run on the controller (root, the lab up, the site deployed), by the molecule scenarios
`resync` and `failback`:

    python -m ha_lab.crash_writes --crash secondary|primary [--module flightdata]

1. the pair must be PRIM/SECOND; a client (`ha_lab.records.Writer`, client namespace)
   posts records through the VIP and logs every 201;
2. the chosen node is crashed (a power cut); the client keeps writing on the survivor
   (which is, or becomes, ALONE); some files are also written straight into the
   replicated directory on the survivor, so the resync has more than a database to move;
3. the node boots; wait until it is SECOND in sync again (PRIM/SECOND);
4. every acknowledged record is read back through the VIP and checked.

Prints one JSON object (the molecule playbooks assert on it) and exits 1 on an error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from .lab import Lab
from .observe import module_states, states_of
from .records import Writer, read_back


def _pair(module: str, timeout: float) -> tuple[str, str] | None:
    """(primary, secondary) once PRIM/SECOND with the secondary in sync."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = states_of(module)
        prims = [n for n, s in states.items() if s == "PRIM"]
        seconds = [n for n, s in states.items() if s == "SECOND"]
        if len(prims) == 1 and len(seconds) == 1:
            entry = module_states(seconds[0]).get(module, {})
            if entry.get("sync") == "in-sync":
                return prims[0], seconds[0]
        time.sleep(0.5)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--crash", choices=("primary", "secondary"), required=True)
    parser.add_argument("--module", default="flightdata")
    parser.add_argument("--vip", default="10.77.0.100")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--dir", default="/var/lib/flightdata", help="a replicated directory")
    parser.add_argument("--writes", type=int, default=100, help="acknowledged writes per phase")
    parser.add_argument("--files-mib", type=int, default=64, help="MiB written while apart")
    parser.add_argument("--acks-file", help="write {id: seq} of every acknowledged record here")
    args = parser.parse_args()
    lab = Lab()
    result: dict[str, object] = {}
    try:
        ok = run(lab, args, result)
    finally:
        print(json.dumps(result, sort_keys=True))
    return 0 if ok else 1


def run(lab: Lab, args: argparse.Namespace, result: dict[str, object]) -> bool:
    pair = _pair(args.module, 120)
    if pair is None:
        result["error"] = f"not PRIM/SECOND in sync: {states_of(args.module)}"
        return False
    primary, secondary = pair
    victim, survivor = (primary, secondary) if args.crash == "primary" else (secondary, primary)
    result.update(primary=primary, victim=victim, survivor=survivor)
    writer = Writer(args.vip, port=args.port).start()
    try:
        if not writer.wait_acks(args.writes):
            result["error"] = "the client's writes are not acknowledged"
            return False
        crashed_at = time.monotonic()
        lab.crash(victim)
        if not writer.wait_acks(args.writes, after=crashed_at, timeout=60):
            result["error"] = f"{survivor} did not acknowledge writes after the crash"
            return False
        result["survivor_state"] = states_of(args.module).get(survivor)
        script = (
            f"mkdir -p {args.dir}/while-apart && for i in $(seq 1 {args.files_mib}); do "
            f"head -c 1048576 /dev/urandom > {args.dir}/while-apart/$i; done"
        )
        lab_run(lab, survivor, ["sh", "-c", script])
        booted_at = time.monotonic()
        lab.boot(victim)
        pair = _pair(args.module, 300)
        result["after"] = states_of(args.module)
        if pair is None or pair != (survivor, victim):
            result["error"] = f"{victim} did not come back SECOND in sync: {result['after']}"
            return False
        result["resync_s"] = round(time.monotonic() - booted_at, 1)
        if not writer.wait_acks(args.writes, after=time.monotonic()):
            result["error"] = "writes stopped once the pair was back together"
            return False
    finally:
        acks = writer.stop()
    if args.acks_file:
        with open(args.acks_file, "w") as f:
            json.dump({str(a.id): a.seq for a in acks}, f)
    back = read_back(args.vip, acks, port=args.port)
    result.update(
        acknowledged=len(acks),
        failed_requests=writer.failures,
        read_back=back.checked,
        missing=back.missing[:50],
        wrong=back.wrong[:10],
        errors=back.errors[:10],
        served_by=back.served_by,
    )
    return back.ok


def lab_run(lab: Lab, node: str, argv: list[str]) -> None:
    subprocess.run(lab.exec_argv(node, argv), check=True, timeout=300, capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
