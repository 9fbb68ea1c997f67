# Copyright: hapair contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Helpers shared by the hapair.cluster modules that drive ``hactl`` on a node.

Everything here except :func:`run_status` is pure (no I/O) so it can be unit tested
without a node.
"""

from __future__ import annotations

import json
import os

# Every state a module can be in on one node (see DESIGN.md, "States").
STATES = ("STOP", "WAIT", "ALONE", "PRIM", "SECOND", "UP")
ACTIONS = ("start", "stop", "prim", "second", "swap", "drain", "undrain", "resync")

# States in which an action has nothing left to do on this node.
_DONE = {
    "start": frozenset(("WAIT", "ALONE", "PRIM", "SECOND", "UP")),
    "stop": frozenset(("STOP",)),
    "prim": frozenset(("PRIM", "ALONE")),
    "second": frozenset(("SECOND",)),
    "swap": frozenset(),
    # Mirror modules with replicated_dirs, on the primary: always acts (like swap).
    "resync": frozenset(),
    # Farm modules: decided by the entry's `drained` flag (see needs_action).
    "drain": frozenset(),
    "undrain": frozenset(),
}


class HactlError(Exception):
    """hactl failed or answered something this module cannot read."""


def parse_status(text):
    """Turn ``hactl status --json`` output into ``{"node": str|None, "modules": {name: dict}}``
    (with the daemon's ``version`` and ``site_keys``, None when it does not give them).

    Accepts a list of module objects, or an object with a ``modules`` member that is a
    list of module objects or a mapping ``name -> object``. A module object names its
    module in ``name`` or ``module``. Each keeps every field hactl gave, with ``name`` and
    an upper-case ``state`` guaranteed.
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise HactlError("hactl status --json did not print JSON: %s" % exc)
    node = None
    if isinstance(data, dict):
        node = data.get("node")
        items = data.get("modules", [])
    else:
        items = data
    if isinstance(items, dict):
        items = [dict(value, name=value.get("name", key)) for key, value in items.items()]
    if not isinstance(items, list):
        raise HactlError("hactl status --json: expected a list of modules, got %r" % type(items).__name__)
    modules = {}
    for item in items:
        if isinstance(item, dict) and "name" not in item and "module" in item:
            item = dict(item, name=item["module"])
        if not isinstance(item, dict) or "name" not in item or "state" not in item:
            raise HactlError("hactl status --json: module entry without name/state: %r" % (item,))
        entry = dict(item)
        entry["state"] = str(item["state"]).upper()
        if node is None and item.get("node"):
            node = item["node"]
        modules[str(item["name"])] = entry
    version = data.get("version") if isinstance(data, dict) else None
    # Fingerprints of the site keys the daemon runs with (playbooks/rotate_secrets.yml).
    site_keys = data.get("site_keys") if isinstance(data, dict) else None
    return {"node": node, "modules": modules, "version": version, "site_keys": site_keys}


def needs_action(action, state, entry=None):
    """True when ``action`` would change a module currently in ``state`` on this node.

    ``drain``/``undrain`` (farm modules) look at the status entry's ``drained`` flag.
    """
    if action not in _DONE:
        raise ValueError("unknown action %r" % action)
    if action in ("drain", "undrain"):
        drained = bool((entry or {}).get("drained"))
        return drained != (action == "drain")
    return state not in _DONE[action]


def normalize_states(wanted):
    """Upper-case and check a list of states to wait for; raises ValueError on an unknown one."""
    result = []
    for state in wanted or []:
        upper = str(state).upper()
        if upper not in STATES:
            raise ValueError("unknown state %r (expected one of %s)" % (state, ", ".join(STATES)))
        result.append(upper)
    return result


def state_matches(entry, wanted, sync=None):
    """True when a module entry is in one of ``wanted`` states (and ``sync`` sub-state if given)."""
    if entry is None or entry.get("state") not in wanted:
        return False
    if sync and entry.get("state") == "SECOND":
        return str(entry.get("sync", "")).lower() == sync
    return True


def run_status(module, hactl, name=None):
    """Run ``hactl status [NAME] --json`` on the node; returns :func:`parse_status`'s result."""
    if not os.access(hactl, os.X_OK):
        # run_command would fail the task itself; callers decide (allow_down, check mode).
        raise HactlError("%s is not installed (or not executable) on this node" % hactl)
    cmd = [hactl, "status", "--json"]
    if name:
        cmd.insert(2, name)
    rc, out, err = module.run_command(cmd)
    if rc != 0:
        raise HactlError("%s failed (rc=%d): %s" % (" ".join(cmd), rc, (err or out).strip()))
    return parse_status(out)


def run_wait(module, hactl, name, wanted, sync, timeout):
    """Run ``hactl wait NAME STATE... --json`` on the node: one process asks the daemon every
    0.1 s (polling ``hactl status`` starts an interpreter per poll, which loads the node that
    is taking over). Returns ``(reached, entry, message)``, or None when this node's hactl has
    no ``wait`` (a release before it, met during a rolling upgrade): then poll instead."""
    cmd = [hactl, "wait", name] + list(wanted) + ["--timeout", "%g" % max(timeout, 0.0), "--json"]
    if sync:
        cmd += ["--sync", sync]
    rc, out, err = module.run_command(cmd)
    if rc != 0 and "invalid choice: 'wait'" in err:
        return None
    entry = parse_status(out)["modules"].get(name) if out.strip() else None
    return rc == 0, entry, (err or out).strip()


def parse_verify(text):
    """Turn ``hactl verify MODULE --json`` output into ``{"equal", "files", "message", "dirs"}``.

    Each of ``dirs`` is ``{"dir", "equal", "files", "differences": [str]}``; a difference
    names one file and what each node holds (``PATH: primary f:<sha256>, secondary missing``).
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise HactlError("hactl verify --json did not print JSON: %s" % exc)
    if not isinstance(data, dict) or not isinstance(data.get("dirs"), list):
        raise HactlError("hactl verify --json: expected an object with dirs, got %r" % (data,))
    dirs = []
    for item in data["dirs"]:
        if not isinstance(item, dict) or "dir" not in item:
            raise HactlError("hactl verify --json: directory entry without dir: %r" % (item,))
        diffs = [str(d) for d in item.get("differences") or []]
        dirs.append(dict(dir=str(item["dir"]), equal=bool(item.get("equal")) and not diffs,
                         files=int(item.get("files", 0)), differences=diffs))
    equal = bool(data.get("equal", True)) and all(d["equal"] for d in dirs)
    return dict(equal=equal, files=sum(d["files"] for d in dirs), message=str(data.get("message", "")), dirs=dirs)
