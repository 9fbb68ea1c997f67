"""Name rules of the config files, the one definition the Ansible collection shares.

The collection checks the inventory before rendering anything with the same patterns, kept
in collections/ansible_collections/hapair/cluster/roles/runtime/vars/main.yml;
tests/unit/config/test_name_rules.py fails when the two differ.
"""

from __future__ import annotations

import re

# Node, module, checker and console user names.
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# Heartbeat network names (short: they become parts of interface and nft names).
NETWORK_RE = re.compile(r"^[a-z][a-z0-9_-]{0,14}$")
# Linux interface names (IFNAMSIZ 16 with the terminating NUL).
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
