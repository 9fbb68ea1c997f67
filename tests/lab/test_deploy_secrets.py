"""Deploying from a second controller account never replaces the site's secrets.

The site is deployed (fixture mirror_site) from this account, whose secrets directory is
~/.local/share/hapair/sites/lab. Another account (another $HOME: an empty or different
local cache) then runs deploy.yml:

- with no secrets of its own, and with a different site key, it is refused before any
  node changes, and the message names what differs and what to do;
- given the site key and CA as inventory (vault) variables, it reuses them and the nodes'
  own certificates: nothing on the nodes changes and the daemons are not restarted.

Throughout, a watcher samples flightdata on both nodes: it must stay PRIM on node1 and
SECOND on node2, and neither node may count a heartbeat it could not authenticate.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labcmd import in_node
from siteplay import PlaybookResult, run_playbook

from ha_lab.lab import Lab
from ha_lab.observe import states_of

NODES = ("node1", "node2")
NODE_FILES = ("site.key", "tls/ca.crt", "tls/node.crt", "tls/node.key")
SITE_DIR = Path.home() / ".local/share/hapair/sites/lab"
WHEELHOUSE = Path.home() / ".cache/hapair/wheelhouse"
# Tasks of the runtime role that write on the controller only (the new account's own
# copy of the secrets); every other change would be a change on a node.
CONTROLLER_TASKS = (
    "Create the site's secrets directory on the controller",
    "Create the secrets directory on the controller",
    "Write the site secrets given in the inventory",
    "Reuse the certificate and key the node already has",  # node -> controller copy
    "Reuse the heartbeat pair keys the node already has",  # node -> controller copy
    "Write the certificate extensions of each node",
    "Keep the controller's secret files readable",
)
VALIDATE_PLAY = "Validate the inputs and the nodes before any change"


def _status(lab: Lab, node: str) -> dict[str, Any]:
    proc = in_node(lab, node, "hactl", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def _node_view(lab: Lab, node: str) -> dict[str, str]:
    """SHA-256 of the node's secret files and the daemon's PID (a restart changes it)."""
    paths = [f"/etc/hapair/{f}" for f in NODE_FILES]
    proc = in_node(lab, node, "sha256sum", *paths)
    assert proc.returncode == 0, proc.stderr
    view = {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines()}
    pid = in_node(lab, node, "systemctl", "show", "-p", "MainPID", "--value", "hapair")
    view["pid"] = pid.stdout.strip()
    return view


class StateWatch:
    """Samples flightdata's states on every node in a thread until stopped."""

    def __init__(self) -> None:
        self.samples: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(states_of("flightdata"))
            time.sleep(0.3)

    def __enter__(self) -> StateWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture
def homes() -> Iterator[Path]:
    """Where the other accounts' $HOMEs go: a short path, because ssh's ControlPath socket
    lives under $HOME/.ansible/cp and a Unix socket path holds at most 107 bytes (pytest's
    tmp_path, deep and numbered per session, passed that limit on a long-used machine)."""
    base = Path(tempfile.mkdtemp(prefix="hp-", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def watch(mirror_site: Lab) -> Iterator[StateWatch]:
    with StateWatch() as w:
        yield w


def _deploy_as(home: Path, extravars: dict[str, Any] | None = None) -> PlaybookResult:
    home.mkdir(parents=True, exist_ok=True)
    return run_playbook("playbooks/deploy.yml", extravars=extravars, envvars={"HOME": str(home)})


def _refusals(result: PlaybookResult) -> dict[str, str]:
    return {
        str(f.get("host")): str(f.get("res", {}).get("msg", ""))
        for f in result.failures
        if f.get("play") == VALIDATE_PLAY
    }


def test_second_controller_refuses_or_reuses_site_secrets(
    mirror_site: Lab, watch: StateWatch, homes: Path
) -> None:
    lab = mirror_site
    before = {n: _node_view(lab, n) for n in NODES}
    drops_before = {n: _status(lab, n)["heartbeat_drops"] for n in NODES}

    # 1. An account with an empty cache: refused, and it generates nothing of its own.
    empty = _deploy_as(homes / "empty")
    assert empty.status == "failed", empty.stdout[-2000:]
    refused = _refusals(empty)
    assert sorted(refused) == list(NODES), empty.failure_summary()
    for msg in refused.values():
        assert "Refusing to replace the site secrets" in msg, msg
        assert "site key (the controller has none)" in msg, msg
        assert "CA certificate (the controller has none)" in msg, msg
        assert "hapair_runtime_secrets_dir" in msg and "rotate_secrets.yml" in msg, msg
    assert not (homes / "empty/.local/share/hapair/sites/lab/site.key").exists()
    print(f"empty cache refused: {refused['node1']}")

    # 2. An account whose cache holds another site key (copy of the rest): refused.
    other = homes / "other/.local/share/hapair/sites/lab"
    other.mkdir(parents=True)
    for path in SITE_DIR.iterdir():
        if path.is_file():  # (a rotation's working directories are not secrets)
            (other / path.name).write_bytes(path.read_bytes())
    (other / "site.key").write_text(secrets.token_urlsafe(48) + "\n")
    differs = _deploy_as(homes / "other")
    assert differs.status == "failed", differs.stdout[-2000:]
    refused = _refusals(differs)
    assert sorted(refused) == list(NODES), differs.failure_summary()
    for msg in refused.values():
        assert "site key (differs)" in msg and "CA certificate" not in msg, msg

    # 3. An account given the site key and CA in the inventory (vault): it reuses them and
    #    the nodes' own certificates; the wheelhouse cache is the site's too (no rebuild).
    vault = {
        "hapair_runtime_site_key": (SITE_DIR / "site.key").read_text(),
        "hapair_runtime_ca_cert": (SITE_DIR / "ca.crt").read_text(),
        "hapair_runtime_ca_key": (SITE_DIR / "ca.key").read_text(),
        "hapair_runtime_wheelhouse_cache": str(WHEELHOUSE),
    }
    reused = _deploy_as(homes / "vault", vault)
    assert reused.status == "successful", reused.failure_summary()
    new_dir = homes / "vault/.local/share/hapair/sites/lab"
    for node in NODES:
        assert (new_dir / f"{node}.crt").read_bytes() == (SITE_DIR / f"{node}.crt").read_bytes()
    node_changes = [
        f"{e.get('host')}: {e.get('task')}"
        for e in reused.changed
        if e.get("host") in NODES and not str(e.get("task", "")).startswith(CONTROLLER_TASKS)
    ]
    assert node_changes == [], node_changes
    print(f"vault deploy changed on the controller only: {len(reused.changed)} task result(s)")

    after = {n: _node_view(lab, n) for n in NODES}
    assert after == before, "the nodes' secrets or daemons changed"
    drops_after = {n: _status(lab, n)["heartbeat_drops"] for n in NODES}
    for node in NODES:
        forged = drops_after[node].get("forged", 0) - drops_before[node].get("forged", 0)
        assert forged == 0, f"{node} rejected {forged} heartbeat(s): {drops_after[node]}"

    time.sleep(1)  # one more sample after the last run
    samples = list(watch.samples)
    assert len(samples) > 10, samples
    bad = [s for s in samples if s != {"node1": "PRIM", "node2": "SECOND"}]
    assert bad == [], f"{len(bad)}/{len(samples)} samples left PRIM/SECOND: {bad[:5]}"
    print(f"{len(samples)} state samples, all node1 PRIM / node2 SECOND; forged drops +0")
