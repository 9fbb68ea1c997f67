#!/usr/bin/python
# Copyright: hapair contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ha_verify
short_description: Compare per-file digests of a module's replicated directories on both nodes
version_added: "1.0.0"
description:
  - Runs C(hactl verify MODULE --json) on the module's primary. The runtime puts a barrier in
    the replication journal, waits until the secondary has applied it, then compares a digest
    of every file, symbolic link and directory of each replicated directory on both nodes
    while the application keeps running.
  - A path that differs in that first pass (the application may have written it between
    the two digests) is compared again by the runtime at one journal position, with the
    application's writes held for that moment only; only what still differs is reported.
  - With O(attempts) greater than 1 a comparison that found differences runs again after
    O(delay) seconds; the result is that of the first attempt that found the copies
    identical, or of the last one; differences on paths seen in every attempt are also
    reported as RV(persistent).
  - Read only; runs in check mode too.
author:
  - hapair contributors
options:
  module:
    description: Name of the hapair module (a mirror module with C(replicated_dirs)).
    type: str
    required: true
  attempts:
    description: How many comparisons at most before reporting the differences.
    type: int
    default: 3
  delay:
    description: Seconds between two attempts.
    type: float
    default: 2
  fail_on_difference:
    description: Fail when the copies differ (after every attempt). Otherwise report only.
    type: bool
    default: true
  hactl:
    description: Path of the C(hactl) command on the node.
    type: path
    default: /usr/local/bin/hactl
attributes:
  check_mode:
    support: full
    details: Read only; compares in check mode as in a real run.
  diff_mode:
    support: none
notes:
  - Run it on the module's primary (PRIM), with the secondary connected and in sync; the
    runtime refuses otherwise and the module fails with its message.
  - Needs root on the node (the hactl API socket is root only).
seealso:
  - module: hapair.cluster.ha_status
  - module: hapair.cluster.ha_command
"""

EXAMPLES = r"""
- name: Compare flightdata's replicated directories on both nodes (from its primary)
  hapair.cluster.ha_verify:
    module: flightdata
  when: ansible_facts.hapair_status.modules.flightdata.state == 'PRIM'

- name: Report only, never fail
  hapair.cluster.ha_verify:
    module: flightdata
    attempts: 1
    fail_on_difference: false
  register: verify
"""

RETURN = r"""
equal:
  description: Whether every replicated directory is identical on both nodes.
  returned: always
  type: bool
  sample: true
files:
  description: Number of entries compared (every directory together).
  returned: always
  type: int
  sample: 10342
dirs:
  description: One entry per replicated directory.
  returned: always
  type: list
  elements: dict
  contains:
    dir:
      description: The replicated directory.
      type: str
    equal:
      description: Whether it is identical on both nodes.
      type: bool
    files:
      description: Entries compared in it.
      type: int
    differences:
      description: One line per differing entry, naming the path and what each node holds.
      type: list
      elements: str
  sample:
    - dir: /var/lib/flightdata
      equal: false
      files: 2
      differences: ["flightdata.db: primary f:9c1e..., secondary f:02ab..."]
persistent:
  description: Differences of the last attempt on paths that differed in every attempt (not a write in flight).
  returned: always
  type: list
  elements: str
attempts:
  description: How many comparisons ran.
  returned: always
  type: int
message:
  description: The runtime's one-line verdict of the last attempt.
  returned: always
  type: str
"""

import json
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hapair.cluster.plugins.module_utils.hactl import HactlError, parse_verify


def _verify(module, hactl, name):
    cmd = [hactl, "verify", name, "--json"]
    rc, out, err = module.run_command(cmd)
    if rc not in (0, 1) or (rc == 1 and not out.strip().startswith("{")):
        # 1 with JSON: the copies differ; 1 without: the runtime refused (message on stderr).
        raise HactlError("%s refused or failed (rc=%d): %s" % (" ".join(cmd), rc, (err or out).strip()))
    return parse_verify(out)


def _path(difference):
    """The path a difference line names (``PATH: primary ..., secondary ...``)."""
    return difference.rsplit(": primary ", 1)[0]


def main():
    module = AnsibleModule(
        argument_spec=dict(
            module=dict(type="str", required=True),
            attempts=dict(type="int", default=3),
            delay=dict(type="float", default=2),
            fail_on_difference=dict(type="bool", default=True),
            hactl=dict(type="path", default="/usr/local/bin/hactl"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if p["attempts"] < 1:
        module.fail_json(msg="attempts must be at least 1, got %d" % p["attempts"])
    result = dict(changed=False, attempts=0)
    persistent = None
    try:
        for attempt in range(p["attempts"]):
            if attempt:
                time.sleep(p["delay"])
            report = _verify(module, p["hactl"], p["module"])
            result["attempts"] = attempt + 1
            paths = set(_path(d) for item in report["dirs"] for d in item["differences"])
            persistent = paths if persistent is None else persistent & paths
            if report["equal"]:
                break
    except (HactlError, OSError) as exc:
        module.fail_json(msg=str(exc), **result)
    lines = ["%s: %s" % (d["dir"], x) for d in report["dirs"] for x in d["differences"]]
    kept = persistent or set()
    result.update(report, persistent=["%s: %s" % (d["dir"], x) for d in report["dirs"] for x in d["differences"] if _path(x) in kept])
    if not report["equal"] and p["fail_on_difference"]:
        module.fail_json(
            msg="%s: the copies differ after %d comparison(s): %d difference(s): %s"
            % (p["module"], result["attempts"], len(lines), json.dumps(lines[:50])),
            **result
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
