"""The lab as a whole: the Python API behind `ha-lab`, used by tests and molecule too."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import faults, network, rootfs
from .node import Node
from .system import LabError, all_pids, cmdline, kill_and_wait, run, unmount_all
from .topology import (
    CACHE_DIR,
    CLIENT_HOST,
    CLIENT_NS,
    CONTROLLER_HOST,
    LAN,
    LOCK_FILE,
    MAX_NODES,
    MGMT,
    NETWORKS,
    NODES_DIR,
    PREFIX,
    SSH_DIR,
    SSH_KEY,
    STATE_DIR,
    WITNESS_HOST,
    WITNESS_NS,
    node_host,
    node_index,
    node_name,
)

INVENTORY_RELATIVE = Path("inventories/lab/hosts.yml")


def project_root() -> Path:
    """The repository holding inventories/: from the working directory up, else ours."""
    env = os.environ.get("HAPAIR_ROOT")
    if env:
        return Path(env)
    for candidate in [Path.cwd(), *Path.cwd().parents]:
        if (candidate / "ansible.cfg").exists() and (candidate / "inventories").is_dir():
            return candidate
    return Path(__file__).resolve().parents[2]


@contextmanager
def locked() -> Iterator[None]:
    """One lab operation at a time: two `up`s racing would wire the same links twice."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_FILE.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("ha-lab needs root: it creates namespaces, bridges and containers")


def _ensure_ssh_key() -> None:
    SSH_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not SSH_KEY.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ha-lab", "-f", str(SSH_KEY)])


def existing_nodes() -> list[str]:
    if not NODES_DIR.is_dir():
        return []
    names = [path.name for path in NODES_DIR.iterdir() if path.is_dir()]
    return sorted((n for n in names if n.startswith("node")), key=node_index)


class Lab:
    def node(self, name: str) -> Node:
        try:
            node = Node(name)
        except ValueError as exc:
            raise LabError(str(exc)) from exc
        if name not in existing_nodes():
            raise LabError(f"{name} is not part of the lab (run `ha-lab up`)")
        return node

    # -- life cycle -------------------------------------------------------------------

    def up(self, nodes: int = 2) -> dict[str, Any]:
        if not 2 <= nodes <= MAX_NODES:
            raise LabError(f"--nodes must be between 2 and {MAX_NODES}, got {nodes}")
        _require_root()
        with locked():
            _ensure_ssh_key()
            image = rootfs.ensure_image()
            network.ensure_fabric()
            wanted = [node_name(k) for k in range(1, nodes + 1)]
            for extra in set(existing_nodes()) - set(wanted):
                self._destroy_node(Node(extra))
            for name in wanted:
                node = Node(name)
                node.ensure_disk(image)
                node.start()
            faults.ensure_table(wanted)
            with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
                list(pool.map(lambda n: Node(n).wait_ssh(), wanted))
            self._write_inventory(wanted)
        return self.describe()

    def down(self) -> None:
        _require_root()
        with locked():
            self._kill_containers()
            network.teardown_all()
            for name in existing_nodes():
                Node(name).release_disk()
            unmount_all(STATE_DIR)
            for staging in CACHE_DIR.glob("*.tmp") if CACHE_DIR.is_dir() else []:
                unmount_all(staging)  # a debootstrap killed halfway
            self._detach_loops()
            shutil.rmtree(NODES_DIR, ignore_errors=True)
            (project_root() / INVENTORY_RELATIVE).unlink(missing_ok=True)

    @staticmethod
    def _kill_containers() -> None:
        for name in existing_nodes():
            node = Node(name)
            init = node.init_pid()
            kill_and_wait([init] if init else [])
        # Also containers whose node directory is already gone (a half-finished down).
        strays = [
            pid
            for pid in all_pids()
            if (argv := cmdline(pid))
            and argv[0].endswith("systemd-nspawn")
            and any(arg.startswith(f"--machine={PREFIX}-") for arg in argv)
        ]
        kill_and_wait(strays)

    @staticmethod
    def _detach_loops() -> None:
        out = run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"]).stdout
        for line in out.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[1].startswith(str(STATE_DIR)):
                run(["losetup", "-d", parts[0]], check=False)

    def _destroy_node(self, node: Node) -> None:
        node.crash()
        node.release_disk()
        shutil.rmtree(node.paths.base, ignore_errors=True)

    # -- faults -----------------------------------------------------------------------

    def crash(self, name: str) -> None:
        _require_root()
        with locked():
            self.node(name).crash()

    def boot(self, name: str) -> None:
        _require_root()
        node = self.node(name)
        with locked():
            node.ensure_disk(rootfs.ensure_image())
            node.start()
            faults.restore(name)  # a powered-on server comes back on healthy links
        node.wait_ssh()

    def cut(self, name: str, net: str = "all") -> None:
        self.node(name)
        faults.cut(name, net)

    def loss(self, name: str, percent: int, net: str = "all") -> None:
        self.node(name)
        faults.loss(name, percent, net)

    def restore(self, name: str) -> None:
        self.node(name)
        faults.restore(name)

    def fill(self, name: str, path: str) -> str:
        """Fill the file system holding path inside the node; returns the filler file."""
        node = self.node(name)
        filler = f"{path.rstrip('/')}/.ha-lab-fill"
        script = (
            f'set -e; avail=$(df --output=avail -B1 "{path}" | tail -1); '
            f'fallocate -l "$avail" "{filler}" 2>/dev/null || true; '
            # Whatever fallocate left (reserved blocks rounding), dd takes until ENOSPC.
            f'dd if=/dev/zero of="{filler}.tail" bs=64k 2>/dev/null || true; sync'
        )
        run(node.exec_command(["sh", "-c", script]), timeout=300)
        return filler

    # -- inspection -------------------------------------------------------------------

    def exec_argv(self, name: str, argv: list[str]) -> list[str]:
        return self.node(name).exec_command(argv)

    @staticmethod
    def client_argv(argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", CLIENT_NS, *argv]

    @staticmethod
    def witness_argv(argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", WITNESS_NS, *argv]

    def describe(self) -> dict[str, Any]:
        nodes = []
        for name in existing_nodes():
            node = Node(name)
            host = node_host(node.index)
            nodes.append(
                {
                    "name": name,
                    "running": node.running(),
                    "init_pid": node.init_pid(),
                    "addresses": {net.name: net.address(host) for net in NETWORKS},
                    "interfaces": {net.name: f"{net.name}0" for net in NETWORKS},
                    "faults": faults.active(name) if node.running() else [],
                    "ssh": f"ssh -i {SSH_KEY} root@{node.mgmt_address}",
                }
            )
        return {
            "nodes": nodes,
            "controller": {"mgmt": MGMT.address(CONTROLLER_HOST)},
            "client": {"netns": CLIENT_NS, "lan": LAN.address(CLIENT_HOST)},
            "witness": {"netns": WITNESS_NS, "lan": LAN.address(WITNESS_HOST)},
            "networks": {net.name: f"{net.subnet}.0/24" for net in NETWORKS},
            "ssh_key": str(SSH_KEY),
            "ssh_user": "root",
            "inventory": str(project_root() / INVENTORY_RELATIVE),
            "image": str(rootfs.image_dir()),
        }

    @staticmethod
    def _write_inventory(names: list[str]) -> None:
        hosts = {
            name: {"ansible_host": MGMT.address(node_host(node_index(name)))} for name in names
        }
        inventory = {
            "all": {
                "children": {
                    "hapair_nodes": {
                        "hosts": hosts,
                        "vars": {
                            "ansible_user": "root",
                            "ansible_ssh_private_key_file": str(SSH_KEY),
                            "ansible_python_interpreter": "/usr/bin/python3",
                        },
                    }
                }
            }
        }
        path = project_root() / INVENTORY_RELATIVE
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "# Written by `ha-lab up` (connection details of the lab's nodes); do not edit.\n"
        # JSON is valid YAML: no YAML dumper needed, and the file is stable across runs.
        path.write_text(header + json.dumps(inventory, indent=2) + "\n")
