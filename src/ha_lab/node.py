"""One lab node: its own disk, an overlay over the cached image, a booted container.

The disk is a sparse ext4 image on a loop device so a node has a bounded file system
(`fill` must fill the node, not the host) that survives a crash, as a server's disk does.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import network
from .system import LabError, alive, all_pids, children, cmdline, kill_and_wait, run, unmount_all
from .topology import MGMT, SSH_KEY, node_dir, node_host, node_index, node_name, node_ns

DISK_SIZE = "8G"
SSH_OPTIONS = (
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=3",
)  # fmt: skip


@dataclass(frozen=True)
class NodePaths:
    base: Path

    @property
    def disk_image(self) -> Path:
        return self.base / "disk.img"

    @property
    def disk(self) -> Path:
        return self.base / "disk"

    @property
    def upper(self) -> Path:
        return self.disk / "upper"

    @property
    def work(self) -> Path:
        return self.disk / "work"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def console(self) -> Path:
        return self.base / "console.log"


class Node:
    def __init__(self, name: str) -> None:
        node_index(name)  # validates the name
        self.name = name
        self.paths = NodePaths(node_dir(name))

    @property
    def index(self) -> int:
        return node_index(self.name)

    @property
    def mgmt_address(self) -> str:
        return MGMT.address(node_host(self.index))

    @property
    def machine(self) -> str:
        return node_ns(self.name)

    # -- disk -------------------------------------------------------------------------

    def ensure_disk(self, image: Path) -> None:
        """Create (first time) and mount the node's disk and its root overlay."""
        paths = self.paths
        paths.base.mkdir(parents=True, exist_ok=True)
        fresh = not paths.disk_image.exists()
        if fresh:
            run(["truncate", "-s", DISK_SIZE, str(paths.disk_image)])
            run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", self.name, str(paths.disk_image)])
        paths.disk.mkdir(exist_ok=True)
        if not os.path.ismount(paths.disk):
            # Direct I/O: the loop device writes to the host's disk as a server's disk would,
            # not through the host's page cache. Buffered, its kernel worker copied every
            # byte a node wrote a second time (12 % of the machine's CPU in the 1 MiB
            # replication benchmark) and the lab fell into a mode twice as slow at random.
            # (mount -o loop keeps its auto-detach on unmount; direct I/O is set after.)
            disk_image = str(paths.disk_image)
            run(["mount", "-o", "loop", disk_image, str(paths.disk)])
            listed = run(["losetup", "--noheadings", "--output", "NAME", "-j", disk_image])
            for dev in listed.stdout.split():
                run(["losetup", "--direct-io=on", dev])
        # Explicit modes, whatever the caller's umask: the upper directory becomes the
        # node's "/", and a 0700 root locks every non-root service out of the node.
        for directory in (paths.upper, paths.work, paths.root):
            directory.mkdir(exist_ok=True)
            directory.chmod(0o755)
        if not os.path.ismount(paths.root):
            options = f"lowerdir={image},upperdir={paths.upper},workdir={paths.work}"
            run(["mount", "-t", "overlay", "overlay", "-o", options, str(paths.root)])
        if fresh or not (paths.root / "etc/ssh/ssh_host_ed25519_key").exists():
            self._write_identity()

    def _write_identity(self) -> None:
        root = self.paths.root
        (root / "etc/hostname").write_text(f"{self.name}\n")
        (root / "etc/machine-id").write_text(secrets.token_hex(16) + "\n")
        hosts = ["127.0.0.1 localhost", f"127.0.1.1 {self.name}"]
        hosts += [f"{MGMT.address(node_host(k))} {node_name(k)}" for k in range(1, 5)]
        (root / "etc/hosts").write_text("\n".join(hosts) + "\n")
        run(["ssh-keygen", "-A", "-f", str(root)])
        ssh_dir = root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        authorized.write_text(SSH_KEY.with_suffix(".pub").read_text())
        authorized.chmod(0o600)

    def release_disk(self) -> None:
        unmount_all(self.paths.base)
        out = run(["losetup", "-j", str(self.paths.disk_image)], check=False).stdout
        for line in out.splitlines():
            run(["losetup", "-d", line.split(":", 1)[0]], check=False)

    # -- processes --------------------------------------------------------------------

    def nspawn_pids(self) -> list[int]:
        marker = f"--machine={self.machine}"
        return [
            pid
            for pid in all_pids()
            if (argv := cmdline(pid)) and argv[0].endswith("systemd-nspawn") and marker in argv
        ]

    def init_pid(self) -> int | None:
        """PID (host view) of the node's systemd, the init of its PID namespace."""
        host_ns = os.readlink("/proc/self/ns/pid")
        for parent in self.nspawn_pids():
            for child in children(parent):
                try:
                    if os.readlink(f"/proc/{child}/ns/pid") != host_ns:
                        return child
                except OSError:
                    continue
        return None

    def running(self) -> bool:
        return any(alive(pid) for pid in self.nspawn_pids())

    def start(self) -> None:
        """Boot the node (its network fresh); returns once systemd runs, not sshd."""
        if self.running():
            return
        network.plug_node(self.name)
        cmd = [
            "systemd-nspawn", "--boot", "--quiet",
            f"--directory={self.paths.root}",
            f"--machine={self.machine}",
            f"--hostname={self.name}",
            "--register=no", "--keep-unit",
            f"--network-namespace-path=/run/netns/{self.machine}",
            "--bind=/dev/fuse",
            "--capability=CAP_NET_ADMIN,CAP_SYS_ADMIN,CAP_NET_RAW",
            "--console=read-only",
            "--resolv-conf=off", "--timezone=off", "--link-journal=no",
        ]  # fmt: skip
        with self.paths.console.open("ab") as console:
            # Its own session: the lab's node outlives the ha-lab command that booted it.
            subprocess.Popen(
                cmd,
                # A node owns its network namespace, so it may tune it (ip_nonlocal_bind,
                # arp_announce) as a real server does; the rest of /proc/sys stays read-only.
                env={**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"},
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while self.init_pid() is None:
            if time.monotonic() > deadline:
                tail = self.paths.console.read_text(errors="replace")[-2000:]
                raise LabError(f"{self.name}: systemd-nspawn did not start:\n{tail}")
            time.sleep(0.05)

    def wait_ssh(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self._ssh_banner():
                proc = run(self.ssh_command(["true"]), check=False, timeout=15)
                if proc.returncode == 0:
                    return
                last = proc.stderr.strip()
            if not self.running():
                raise LabError(f"{self.name}: node stopped while booting; see {self.paths.console}")
            time.sleep(0.2)
        raise LabError(f"{self.name}: sshd did not answer on {self.mgmt_address}:22: {last}")

    def _ssh_banner(self) -> bool:
        try:
            with socket.create_connection((self.mgmt_address, 22), timeout=1) as conn:
                conn.settimeout(2)
                return conn.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def ssh_command(self, argv: list[str]) -> list[str]:
        return ["ssh", *SSH_OPTIONS, "-i", str(SSH_KEY), f"root@{self.mgmt_address}", *argv]

    def crash(self) -> None:
        """Power cut: kill the PID namespace's init (taking every process with it),
        then unplug every link so no address, VIP, ARP answer or rule of it survives."""
        init = self.init_pid()
        kill_and_wait([pid for pid in [init] if pid is not None])
        kill_and_wait(self.nspawn_pids())
        network.unplug_node(self.name)

    def exec_command(self, argv: list[str]) -> list[str]:
        """A command line that runs argv inside the node, in all its namespaces."""
        init = self.init_pid()
        if init is None:
            raise LabError(f"{self.name} is not running (boot it with `ha-lab boot {self.name}`)")
        env = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME=/root", "LANG=C.UTF-8", f"TERM={os.environ.get('TERM', 'dumb')}"]  # fmt: skip
        return ["nsenter", f"--target={init}", "--all", "--root", "--wd", "--", *env, *argv]
