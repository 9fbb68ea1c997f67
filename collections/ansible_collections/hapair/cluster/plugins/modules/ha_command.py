#!/usr/bin/python
# Copyright: hapair contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ha_command
short_description: Start, stop, promote, demote or swap a hapair module, and wait for a state
version_added: "1.0.0"
description:
  - Runs C(hactl ACTION MODULE) on the node, only when the module is not already where
    the action would bring it (C(start), C(stop), C(prim) and C(second) are idempotent;
    C(swap) always acts).
  - Then, if O(wait_for) is given, runs C(hactl wait) until the module is in one of those
    states on this node, or fails after O(timeout) seconds. One process asks the daemon
    every 0.1 s; on a node whose hactl has no C(wait) (a release before it, during a
    rolling upgrade), C(hactl status --json) is polled every O(poll_interval) instead.
  - The runtime refuses an action that is not safe (for example C(swap) when the peer
    is not in sync); the module fails with the runtime's message and nothing changes.
author:
  - hapair contributors
options:
  module:
    description: Name of the hapair module.
    type: str
    required: true
  action:
    description:
      - What to do. C(start) starts the module on this node (it then becomes PRIM,
        SECOND, ALONE or WAIT according to the runtime's rules); C(stop) stops it;
        C(prim) and C(second) force the role on this node; C(swap) performs a planned
        switchover of a mirror module (either node may run it).
      - C(drain) (farm modules) gives every bucket of this node away, so new connections
        go to the other nodes while established ones finish here; C(undrain) takes this
        node's share back. Both are idempotent (the status entry's C(drained) flag).
      - C(resync) (mirror modules with C(replicated_dirs), on the primary) asks the runtime to
        resynchronise the secondary now (C(hactl resync)), incrementally or, with O(full),
        by a checksum delta over the whole tree. It always acts; wait for the result with
        O(wait_for=PRIM) (the primary becomes PRIM once the peer is in sync again).
      - Omit to only wait for O(wait_for).
    type: str
    choices: [start, stop, prim, second, swap, drain, undrain, resync]
  full:
    description:
      - With O(action=resync), a full resync (rolling checksum delta over every file) instead
        of the incremental one (the recorded changed ranges only).
    type: bool
    default: false
  wait_for:
    description:
      - States to wait for on this node after the action (any one of them).
    type: list
    elements: str
    choices: [STOP, WAIT, ALONE, PRIM, SECOND, UP]
  sync:
    description:
      - When waiting for C(SECOND), also wait for this replication sub-state.
    type: str
    choices: [in-sync, resyncing]
  timeout:
    description: Seconds to wait for O(wait_for) before failing.
    type: float
    default: 60
  poll_interval:
    description: Seconds between two C(hactl status) runs while waiting, on a node whose hactl has no C(wait).
    type: float
    default: 0.2
  hactl:
    description: Path of the C(hactl) command on the node.
    type: path
    default: /usr/local/bin/hactl
attributes:
  check_mode:
    support: full
    details:
      - Reports whether the action would run; does not wait for a state the action would reach.
      - When hapair does not answer yet or does not know the module (a dry run of a first
        deployment), reports C(changed) for an action instead of failing.
  diff_mode:
    support: none
notes:
  - Needs root on the node (the hactl API socket is root only).
seealso:
  - module: hapair.cluster.ha_status
"""

EXAMPLES = r"""
- name: Start flightdata and wait until it is PRIM or SECOND here
  hapair.cluster.ha_command:
    module: flightdata
    action: start
    wait_for: [PRIM, SECOND]
    timeout: 30

- name: Planned switchover from the current primary
  hapair.cluster.ha_command:
    module: flightdata
    action: swap
    wait_for: SECOND
  when: ansible_facts.hapair_status.modules.flightdata.state == 'PRIM'

- name: Wait, without acting, for the peer to be an in-sync secondary
  hapair.cluster.ha_command:
    module: flightdata
    wait_for: SECOND
    sync: in-sync
    timeout: 120

- name: Resynchronise the secondary of flightdata from scratch (checksum delta), then wait for PRIM
  hapair.cluster.ha_command:
    module: flightdata
    action: resync
    full: true
    wait_for: PRIM
    timeout: 600
  when: ansible_facts.hapair_status.modules.flightdata.state in ['PRIM', 'ALONE']

- name: Take this node out of the weather farm for maintenance (its buckets move away)
  hapair.cluster.ha_command:
    module: weather
    action: drain
"""

RETURN = r"""
before:
  description: The module's status on this node before the action (fields of C(hactl status --json)).
  returned: when O(action) is given
  type: dict
  sample: {name: flightdata, state: SECOND, peer_state: PRIM}
after:
  description: The module's status on this node at the end.
  returned: always
  type: dict
  sample: {name: flightdata, state: PRIM, peer_state: SECOND}
cmd:
  description: The hactl command line that ran (or would run in check mode).
  returned: when an action was needed
  type: list
  elements: str
  sample: [/usr/local/bin/hactl, swap, flightdata]
stdout:
  description: What hactl printed.
  returned: when an action ran
  type: str
elapsed:
  description: Seconds from the start of the action to the wanted state (or to the end of the action).
  returned: always
  type: float
  sample: 0.84
"""

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hapair.cluster.plugins.module_utils.hactl import (
    ACTIONS,
    HactlError,
    STATES,
    needs_action,
    normalize_states,
    run_status,
    run_wait,
    state_matches,
)


def _entry(module, hactl, name):
    status = run_status(module, hactl, name)
    entry = status["modules"].get(name)
    if entry is None and module.check_mode:
        raise HactlError("no module %r on this node yet" % name)
    if entry is None:
        module.fail_json(msg="no module %r on this node (known: %s)" % (name, ", ".join(sorted(status["modules"])) or "none"))
    return entry


def _wait(module, hactl, name, wanted, start, result):
    """The module's entry once it is in one of ``wanted``; fails the task at the timeout."""
    p = module.params
    if p["action"]:
        # After an action the state is often reached already (a swap on the old primary):
        # one status read, and no `hactl wait` an older hactl would refuse after its start.
        after = _entry(module, hactl, name)
        if state_matches(after, wanted, p["sync"]):
            return after
    remaining = p["timeout"] - (time.monotonic() - start)
    waited = run_wait(module, hactl, name, wanted, p["sync"], remaining)
    if waited is not None:
        reached, after, message = waited
        if reached and after is not None:
            return after
    else:  # an hactl without `wait`: poll its status
        after = _entry(module, hactl, name)
        while not state_matches(after, wanted, p["sync"]) and time.monotonic() < start + p["timeout"]:
            time.sleep(p["poll_interval"])
            after = _entry(module, hactl, name)
        if state_matches(after, wanted, p["sync"]):
            return after
        message = ""
    result["after"] = after
    want = "/".join(wanted) + (" (%s)" % p["sync"] if p["sync"] else "")
    now = after["state"] if after else "unknown"
    module.fail_json(
        msg="module %s is %s on this node, not %s after %.1f s%s" % (name, now, want, p["timeout"], (": " + message) if message else ""),
        **result
    )


def main():
    module = AnsibleModule(
        argument_spec=dict(
            module=dict(type="str", required=True),
            action=dict(type="str", choices=list(ACTIONS)),
            full=dict(type="bool", default=False),
            wait_for=dict(type="list", elements="str", choices=list(STATES)),
            sync=dict(type="str", choices=["in-sync", "resyncing"]),
            timeout=dict(type="float", default=60),
            poll_interval=dict(type="float", default=0.2),
            hactl=dict(type="path", default="/usr/local/bin/hactl"),
        ),
        required_one_of=[("action", "wait_for")],
        supports_check_mode=True,
    )
    p = module.params
    name, action, hactl = p["module"], p["action"], p["hactl"]
    wanted = normalize_states(p["wait_for"])
    result = dict(changed=False, elapsed=0.0)
    # A wait alone reads no status first: each hactl run is an interpreter's start on the
    # node that may be taking over right now (the wait returns the status it reached).
    before = None
    try:
        if action:
            before = _entry(module, hactl, name)
    except (HactlError, OSError) as exc:
        # A dry run of a first deployment: hapair is not installed or running yet, or does
        # not know the module yet. Report what a real run would do instead of failing.
        if module.check_mode and action:
            result.update(changed=True)
            module.exit_json(msg="check mode: hapair cannot tell yet (%s); a real run would %s %s" % (exc, action, name), **result)
        module.fail_json(msg=str(exc), **result)
    try:
        if before is not None:
            result["before"] = before
        start = time.monotonic()
        if action and needs_action(action, before["state"], before):
            cmd = [hactl, action, name]
            if action == "resync" and p["full"]:
                cmd.append("--full")
            result.update(changed=True, cmd=cmd)
            if module.check_mode:
                result["after"] = before
                module.exit_json(msg="would run: %s" % " ".join(cmd), **result)
            rc, out, err = module.run_command(cmd)
            result["stdout"] = out
            if rc != 0:
                module.fail_json(msg="hactl %s %s refused or failed: %s" % (action, name, (err or out).strip()), rc=rc, **result)
        after = _wait(module, hactl, name, wanted, start, result) if wanted else _entry(module, hactl, name)
        result.update(after=after, elapsed=round(time.monotonic() - start, 3))
    except (HactlError, OSError) as exc:
        module.fail_json(msg=str(exc), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
