"""The controller's side of the `upgrade` scenario: the previous release, and its upgrade.

Run by the scenario's playbooks on the controller (root, the lab up); each command prints
one JSON object the playbooks keep and assert on:

    rolling_upgrade.py previous
        builds the wheelhouse of the previous release (PREVIOUS, from `git archive` of this
        repository, with this tree's builder and lock: the same dependencies) for
        converge.yml to deploy as a prebuilt wheelhouse;
    rolling_upgrade.py upgrade --log FILE
        waits for a healthy site, starts the clients (a probe of each VIP every 20 ms, and
        an acknowledged-writes client against flightdata, ha_lab.records), runs
        `ansible-playbook playbooks/upgrade.yml -e upgrade_failback=true` as an operator
        does, stops the clients and reads every acknowledged write back through the VIP;
    rolling_upgrade.py again --log FILE
        runs upgrade.yml once more and counts what it changed (nothing, on an upgraded site).

Measuring here, and not in Ansible, keeps one clock: the clients' CLOCK_MONOTONIC times are
compared with the playbook's start and end on the same clock.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from ha_lab.lab import existing_nodes
from ha_lab.node import Node
from ha_lab.observe import Probe, Sample, longest_outage, module_states
from ha_lab.records import Ack, Writer, read_back

# The previous release: the runtime of the commit the upgrade work (issue 17) started from.
PREVIOUS = "c5b532e"
ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "collections/ansible_collections/hapair/cluster/roles/runtime/files"
VIPS = {"flightdata": "10.77.0.100", "weather": "10.77.0.200"}
# Kept between runs: its key covers the previous release's sources, this tree's lock and
# the controller's Python, so a rebuild happens exactly when one of them changes.
PREVIOUS_CACHE = Path.home() / ".cache/hapair/upgrade-previous"
# Outlives any upgrade; the clients are stopped as soon as the playbook returns.
CLIENT_DURATION_S = 3600.0

TASK = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(?P<task>.*)\]")
CHANGED = re.compile(r"^changed: \[(?P<host>[^\]]+)\]")
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)"
)


def previous_wheelhouse() -> dict[str, Any]:
    """The previous release's wheelhouse, built (or found in the cache) like deploy.yml does."""
    probe = ["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS}^{{commit}}"]
    if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        raise SystemExit(
            f"{ROOT} does not hold commit {PREVIOUS} (the previous release): a shallow clone?"
            " (git fetch --unshallow)"
        )
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS], capture_output=True, check=True
    ).stdout
    with tempfile.TemporaryDirectory(prefix="hapair-previous.") as tmp:
        tree = Path(tmp) / "previous"
        tar = Path(tmp) / "previous.tar"
        tar.write_bytes(archive)
        with tarfile.open(tar) as t:
            t.extractall(tree, filter="data")
        out = subprocess.run(
            [sys.executable, str(BUILDER / "build_wheelhouse.py"), "--project", str(tree),
             "--cache", str(PREVIOUS_CACHE), "--keep", "1",
             "--lock", str(ROOT / "requirements/node.lock")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    built: dict[str, Any] = json.loads(out)
    return {"commit": PREVIOUS, **built}


def node_status(node: str) -> dict[str, Any]:
    """`hactl status --json` of a node; {} when it does not answer."""
    proc = subprocess.run(
        Node(node).exec_command(["hactl", "status", "--json"]),
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        return {}
    try:
        status: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {}
    return status


def site_states() -> dict[str, dict[str, str]]:
    """{node: {module: "PRIM" | "SECOND in-sync" | "UP" ...}} of every module on every node."""
    found: dict[str, dict[str, str]] = {}
    for node in existing_nodes():
        found[node] = {}
        for name, entry in module_states(node).items():
            sync = entry.get("sync")
            state = str(entry.get("state"))
            found[node][name] = f"{state} {sync}" if state == "SECOND" and sync else state
    return found


def wait_site(wanted: dict[str, dict[str, str]] | None, timeout: float) -> tuple[bool, Any]:
    """Wait until every module is as `wanted` on its node; None: flightdata PRIM/SECOND in
    sync on either node (the deploy's restarts may have moved it) and weather UP everywhere."""
    deadline = time.monotonic() + timeout
    while True:
        states = site_states()
        if wanted is None:
            flight = sorted(s.get("flightdata", "") for s in states.values())
            weather = {s.get("weather") for s in states.values()}
            ok = flight == ["PRIM", "SECOND in-sync"] and weather == {"UP"}
        else:
            ok = all(
                states.get(node, {}).get(module) == state
                for node, modules in wanted.items()
                for module, state in modules.items()
            )
        if ok or time.monotonic() > deadline:
            return ok, states
        time.sleep(1)


def run_playbook(log: Path) -> tuple[int, float, str]:
    """`ansible-playbook playbooks/upgrade.yml -i inventories/lab -e upgrade_failback=true`,
    from the repository root with its ansible.cfg; (rc, seconds, output), output also in log."""
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_NOCOLOR": "1",  # plain lines for the counts below
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    argv = [
        "ansible-playbook", str(ROOT / "playbooks/upgrade.yml"),
        "-i", str(ROOT / "inventories/lab"), "-e", "upgrade_failback=true",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, check=False,
    )  # fmt: skip
    took = time.monotonic() - start
    log.write_text(proc.stdout)
    return proc.returncode, took, proc.stdout


def counts(output: str) -> dict[str, Any]:
    """What a run changed: its PLAY RECAP per host, and the tasks that reported changed."""
    recap: dict[str, dict[str, int]] = {}
    changed: list[str] = []
    task = ""
    for line in output.splitlines():
        if m := TASK.match(line):
            task = m["task"]
        elif m := CHANGED.match(line):
            changed.append(f"{m['host']}: {task}")
        elif m := RECAP.match(line):
            recap[m["host"]] = {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
    return {"recap": recap, "changed_tasks": changed}


def longest_gap(times: list[float], start: float, end: float) -> float | None:
    """Longest time between two acknowledgements in [start, end]; None with fewer than 2."""
    inside = [t for t in times if start <= t <= end]
    return max((b - a for a, b in itertools.pairwise(inside)), default=None)


def upgrade(log: Path, result: dict[str, Any]) -> bool:
    ok, states = wait_site(None, timeout=300)
    result["before"] = states
    result["versions_before"] = {n: node_status(n).get("version") for n in existing_nodes()}
    if not ok:
        result["error"] = f"the site is not healthy before the upgrade: {states}"
        return False
    # The writer pauses 20 ms between writes (the probes' cadence): every switchover sees
    # dozens of writes, and reading them all back afterwards stays short.
    writer = Writer(VIPS["flightdata"], pause=0.02, duration=CLIENT_DURATION_S).start()
    probes = {m: Probe(vip, duration=CLIENT_DURATION_S).start() for m, vip in VIPS.items()}
    try:
        if not writer.wait_acks(20, timeout=60):
            result["error"] = "flightdata does not acknowledge writes before the upgrade"
            return False
        time.sleep(2)
        start = time.monotonic()
        rc, took, output = run_playbook(log)
        end = time.monotonic()
        result.update(playbook_rc=rc, upgrade_s=round(took, 1), **counts(output))
        if rc != 0:
            result["error"] = f"upgrade.yml failed (rc {rc}): {output[-3000:]}"
        # Writes go on once the pair is back together.
        elif not writer.wait_acks(20, after=end, timeout=60):
            result["error"] = "flightdata does not acknowledge writes after the upgrade"
        time.sleep(2)
    finally:
        samples = {m: p.stop() for m, p in probes.items()}
        acks = writer.stop()
    measure(samples, acks, writer.failures, (start - 2, end + 2), result)
    in_sync, result["after"] = wait_site(
        {"node1": {"flightdata": "PRIM"}, "node2": {"flightdata": "SECOND in-sync"}}, timeout=120
    )
    result["versions"] = {n: node_status(n).get("version") for n in existing_nodes()}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    result["expected_version"] = pyproject["project"]["version"]
    return in_sync and result["writes"]["lost"] == 0 and "error" not in result


def measure(
    samples: dict[str, list[Sample]],
    acks: list[Ack],
    failed: int,
    window: tuple[float, float],
    result: dict[str, Any],
) -> None:
    """What the clients saw in the window: the longest gap of each VIP, and the writes."""
    start, end = window
    gaps = {m: longest_outage(s, start, end) for m, s in samples.items()}
    result["gaps_s"] = {m: None if g == float("inf") else round(g, 3) for m, g in gaps.items()}
    result["probe_answers"] = {m: sum(1 for x in s if x.node) for m, s in samples.items()}
    result["probe_unanswered"] = {m: sum(1 for x in s if not x.node) for m, s in samples.items()}
    write_gap = longest_gap([a.t for a in acks], start, end)
    # The checker of the chaos campaign and of resync/failback: every acknowledged id read
    # back through the VIP, with the body that was acknowledged.
    back = read_back(VIPS["flightdata"], acks)
    result["writes"] = {
        "acknowledged": len(acks),
        "failed_requests": failed,  # never acknowledged: the client knows they failed
        "read_back": back.checked,
        # Acknowledged and not read back as acknowledged (missing, changed, unreadable, or
        # an id given twice); every one when the check could not run.
        "lost": len(acks) - (back.checked - len(back.missing) - len(back.wrong) - len(back.errors)),
        "missing": back.missing[:50],
        "wrong": back.wrong[:10],
        "errors": back.errors[:10],
        "transient": back.transient[:10],
        "served_by": back.served_by,
        "longest_gap_s": None if write_gap is None else round(write_gap, 3),
    }


def again(log: Path, result: dict[str, Any]) -> bool:
    rc, took, output = run_playbook(log)
    result.update(playbook_rc=rc, seconds=round(took, 1), **counts(output))
    if rc != 0:
        result["error"] = f"upgrade.yml failed (rc {rc}): {output[-3000:]}"
    return rc == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("previous", "upgrade", "again"))
    parser.add_argument("--log", type=Path, help="ansible-playbook's output goes here")
    args = parser.parse_args()
    if args.command == "previous":
        print(json.dumps(previous_wheelhouse(), sort_keys=True))
        return 0
    if args.log is None:
        parser.error(f"{args.command} needs --log")
    result: dict[str, Any] = {}
    try:
        ok = (upgrade if args.command == "upgrade" else again)(args.log, result)
    except Exception as exc:
        # The playbooks judge the JSON: say there what went wrong (the traceback: stderr).
        result.setdefault("error", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        print(json.dumps(result, sort_keys=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
