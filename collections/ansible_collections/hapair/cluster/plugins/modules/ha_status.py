#!/usr/bin/python
# Copyright: hapair contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ha_status
short_description: Read the state of every hapair module on a node
version_added: "1.0.0"
description:
  - Runs C(hactl status --json) on the node and returns the state of each hapair
    module (C(STOP), C(WAIT), C(ALONE), C(PRIM), C(SECOND), C(UP)) with the details
    hactl reports (peer state, virtual IP, last transition, reason).
  - The result is also set as the fact C(hapair_status).
  - Read only; never changes anything.
author:
  - hapair contributors
options:
  module:
    description:
      - Only report this module. By default every module of the node is reported.
    type: str
  hactl:
    description:
      - Path of the C(hactl) command on the node.
    type: path
    default: /usr/local/bin/hactl
  allow_down:
    description:
      - When the hapair daemon does not answer, return RV(running=false) instead of
        failing. Useful for pre-checks that want to report a clear message themselves.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  facts:
    support: full
notes:
  - Needs root on the node (the hactl API socket is root only); use C(become) when
    connecting as another user.
seealso:
  - module: hapair.cluster.ha_command
"""

EXAMPLES = r"""
- name: Read the states of every module
  hapair.cluster.ha_status:

- name: Check that flightdata is primary here
  hapair.cluster.ha_status:
    module: flightdata
  register: status
  failed_when: status.modules.flightdata.state != 'PRIM'

- name: Pre-check that tolerates a stopped daemon
  hapair.cluster.ha_status:
    allow_down: true
  register: status

- name: Use the fact
  ansible.builtin.debug:
    msg: "{{ ansible_facts.hapair_status.modules.flightdata.state }}"
"""

RETURN = r"""
running:
  description: Whether the hapair daemon answered.
  returned: always
  type: bool
  sample: true
node:
  description: Name of the node as the runtime knows it.
  returned: when running
  type: str
  sample: node1
version:
  description:
    - Version of the hapair runtime the node's daemon runs (C(hactl status --json)).
  returned: when running
  type: str
  sample: 1.0.0
site_keys:
  description:
    - Fingerprints (first 16 hex digits of the SHA-256 of the key, never the key) of the site
      key the daemon runs with (C(current)) and of the other keys it accepts during a site key
      rotation (C(accepted)), as read when it started. Absent with a runtime older than
      site key rotation.
  returned: when running
  type: dict
  sample:
    current: 3f2a9c0d41b7e6a8
    accepted: []
modules:
  description:
    - Every module (or the one asked for) by name, with every field C(hactl status --json)
      gives. C(state) is always present and upper case.
  returned: always
  type: dict
  sample:
    flightdata:
      name: flightdata
      type: mirror
      state: PRIM
      peer_state: SECOND
      vip: 10.77.0.100/24
msg:
  description: Why the daemon was considered down.
  returned: when not running
  type: str
ansible_facts:
  description: Facts set by this module.
  returned: always
  type: dict
  contains:
    hapair_status:
      description: Same content as RV(running), RV(node), RV(version), RV(site_keys) and RV(modules).
      returned: always
      type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hapair.cluster.plugins.module_utils.hactl import HactlError, run_status


def main():
    module = AnsibleModule(
        argument_spec=dict(
            module=dict(type="str"),
            hactl=dict(type="path", default="/usr/local/bin/hactl"),
            allow_down=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    name = module.params["module"]
    try:
        status = run_status(module, module.params["hactl"], name)
    except (HactlError, OSError) as exc:
        if not module.params["allow_down"]:
            module.fail_json(msg="hapair daemon not reachable: %s" % exc)
        down = dict(running=False, node=None, modules={})
        module.exit_json(changed=False, msg=str(exc), ansible_facts=dict(hapair_status=down), **down)
    modules = status["modules"]
    if name is not None:
        if name not in modules:
            module.fail_json(msg="no module %r on this node (known: %s)" % (name, ", ".join(sorted(modules)) or "none"))
        modules = {name: modules[name]}
    result = dict(
        running=True, node=status["node"], version=status.get("version"), site_keys=status.get("site_keys"), modules=modules
    )
    module.exit_json(changed=False, ansible_facts=dict(hapair_status=result), **result)


if __name__ == "__main__":
    main()
