"""hapair.cluster.ha_command's wait: one `hactl wait`, and polling only for an older hactl.

The module runs as Ansible runs it (a subprocess reading its arguments on stdin) against a
stand-in hactl that logs every call: a node's hactl with `wait`, or one of a release
before it (argparse refuses `wait`), met on the old node of a rolling upgrade.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MODULE = ROOT / "collections/ansible_collections/hapair/cluster/plugins/modules/ha_command.py"

# argv[1:] is logged; the n-th call (from 0, any command), when it is `status`, answers
# the n-th state of STATES (the last repeats);
# `wait` answers FINAL with the exit code WAIT_RC, or is refused when WAIT_RC is "old".
FAKE_HACTL = """#!{python}
import json, os, sys
from pathlib import Path
here = Path(__file__).parent
with open(here / "calls", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
def status(state):
    return json.dumps({{"node": "node2", "modules": [{{"name": "flightdata", "state": state}}]}})
if sys.argv[1] == "status":
    states = os.environ["STATES"].split(",")
    n = len((here / "calls").read_text().splitlines()) - 1
    print(status(states[min(n, len(states) - 1)]))
elif sys.argv[1] == "wait":
    if os.environ["WAIT_RC"] == "old":
        print("hactl: error: argument COMMAND: invalid choice: 'wait' (choose from ...)",
              file=sys.stderr)
        sys.exit(2)
    print(status(os.environ["FINAL"]))
    if os.environ["WAIT_RC"] != "0":
        print("hactl: flightdata is SECOND, not PRIM, after 3 s", file=sys.stderr)
    sys.exit(int(os.environ["WAIT_RC"]))
"""


def run(
    tmp_path: Path, action: str | None = None, wait_for: str = "PRIM", **env: str
) -> tuple[dict[str, object], list[str]]:
    hactl = tmp_path / "hactl"
    hactl.write_text(FAKE_HACTL.format(python=sys.executable))
    hactl.chmod(0o755)
    args = {"module": "flightdata", "wait_for": [wait_for], "timeout": 3, "poll_interval": 0.01}
    if action:
        args["action"] = action
    payload = {"ANSIBLE_MODULE_ARGS": {**args, "hactl": str(hactl)}}
    proc = subprocess.run(
        [sys.executable, str(MODULE)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "collections"), **env},
        check=False,
    )
    calls = (tmp_path / "calls").read_text().splitlines()
    return json.loads(proc.stdout), calls


def test_one_hactl_wait_instead_of_polling(tmp_path: Path) -> None:
    result, calls = run(tmp_path, STATES="SECOND", FINAL="PRIM", WAIT_RC="0")
    assert not result.get("failed"), result
    assert result["after"]["state"] == "PRIM"  # type: ignore[index]
    assert [c.split()[0] for c in calls] == ["wait"], calls  # no status read before a wait alone
    assert calls[0].startswith("wait flightdata PRIM --timeout ") and calls[0].endswith("--json")


def test_an_older_hactl_is_polled(tmp_path: Path) -> None:
    result, calls = run(tmp_path, STATES="SECOND,WAIT,WAIT,PRIM", FINAL="-", WAIT_RC="old")
    assert not result.get("failed"), result
    assert result["after"]["state"] == "PRIM"  # type: ignore[index]
    # calls 1 to 3 poll the status (WAIT, WAIT, then PRIM)
    assert [c.split()[0] for c in calls] == ["wait", "status", "status", "status"], calls


def test_a_wait_that_times_out_fails_with_the_state_and_why(tmp_path: Path) -> None:
    result, _ = run(tmp_path, STATES="SECOND", FINAL="SECOND", WAIT_RC="1")
    assert result.get("failed") is True, result
    msg = str(result["msg"])
    assert "module flightdata is SECOND on this node, not PRIM after 3.0 s" in msg
    assert "after 3 s" in msg  # hactl's own reason, kept


def test_after_an_action_a_state_already_reached_needs_no_wait(tmp_path: Path) -> None:
    # the old primary of a rolling upgrade: its hactl has no `wait`, and it is SECOND at once
    states = {"STATES": "PRIM,-,SECOND", "FINAL": "-", "WAIT_RC": "old"}
    result, calls = run(tmp_path, "swap", "SECOND", **states)
    assert not result.get("failed"), result
    assert [c.split()[0] for c in calls] == ["status", "swap", "status"], calls


def test_after_an_action_a_state_not_reached_yet_is_waited_for(tmp_path: Path) -> None:
    result, calls = run(tmp_path, "prim", STATES="SECOND,-,ALONE", FINAL="PRIM", WAIT_RC="0")
    assert not result.get("failed"), result
    assert [c.split()[0] for c in calls] == ["status", "prim", "status", "wait"], calls
