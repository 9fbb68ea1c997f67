"""`hactl replicate primary|secondary|spare MODULE --dir N`: one replicated directory, one
process (the process entry of ``ha_runtime.replication``; the daemon's
``mirror.supervisor`` supervises it).

pyfuse3 serves one mount per process, so the daemon runs every replicated directory's
service in a child of its own (both roles, for one way of supervising them). The child
talks to the daemon over its stdin/stdout, one JSON object per line:

daemon -> child: ``{"cmd": "stop"}`` (primary: drain the peer, unmount, exit),
``{"cmd": "generation", "value": HEX}`` (primary: the manager's data generation),
``{"cmd": "resync", "full": BOOL}``, ``{"cmd": "verify", "id": N}``,
``{"cmd": "fenced", "token": T}`` (primary: the peer is fenced off its old copy).

child -> daemon: ``{"type": "started"}`` (primary: the mount is up; secondary: listening),
``{"type": "status", "status": {...}}`` (twice a second), ``{"type": "event", "kind": ...,
"detail": {...}}``, ``{"type": "reply", "id": N, "result": ...}`` or ``"error"``,
``{"type": "fence", "token": T, "declared": HEX|null}`` (primary: an fsync is to be
acknowledged without the peer; answered by ``fenced`` once the daemon has fenced the peer
off its old copy: docs/replication.md, acknowledgement rule). A fresh ``status`` always
precedes ``fence``, so the daemon decides on the state that made the child ask.

End of stdin (the daemon died) stops the child as ``stop`` does. Logs go to stderr (the
journal of hapair.service).

A ``spare`` is started ahead of need and waits, imported, for its role: its first line from
the daemon is ``{"cmd": "role", "role": "primary"|"secondary"}``; then it is that child.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from ha_runtime.config import ClusterConfig, ModuleConfig
from ha_runtime.journal_log import stderr_handler
from ha_runtime.jsonlines import json_objects
from ha_runtime.replication.layout import Layout

if TYPE_CHECKING:  # the daemon imports this module for mounted/unmount: keep it light
    pass

log = logging.getLogger("hapair.replicate")

STATUS_PERIOD_S = 0.5
# How long a spare given its role waits for its idle-priority imports to finish before it
# starts over as a fresh child of the role.
IMPORT_WAIT_S = 0.1


def mounted(path: Path) -> bool:
    """Is something (maybe a dead FUSE server's mount) mounted at path?"""
    # Never stat the mount point itself: a hung FUSE server would block the caller.
    target = os.path.join(os.path.realpath(path.parent), path.name)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) in (target, str(path)):
            return True
    return False


def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape") if "\\" in s else s


def unmount(path: Path) -> None:
    """Lazy unmount (a dead FUSE mount answers ENOTCONN to everything)."""
    while mounted(path):
        r = subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise OSError(f"cannot unmount {path}: {r.stderr.strip()}")


def prepare_dirs(layout: Layout) -> list[str]:
    """Make app_dir an empty, unmounted directory and backing the copy; report what moved.

    Files found in the (unmounted) application directory are either the data of a
    directory that was not replicated before (adopted into an empty, never synced backing
    directory) or writes made behind the replicator's back (moved aside, never deleted)."""
    app_dir, backing = layout.app_dir, layout.backing
    notes: list[str] = []
    if mounted(app_dir):
        unmount(app_dir)
        notes.append(f"unmounted a stale mount at {app_dir}")
    app_dir.mkdir(parents=True, exist_ok=True)
    created = not backing.exists()
    backing.mkdir(parents=True, exist_ok=True)
    if created:
        st = app_dir.stat()
        os.chown(backing, st.st_uid, st.st_gid)
        os.chmod(backing, st.st_mode & 0o7777)
    entries = sorted(os.listdir(app_dir))
    if not entries:
        return notes
    never_synced = not layout.synced.exists()
    if never_synced and not os.listdir(backing):
        for e in entries:
            shutil.move(app_dir / e, backing / e)
        notes.append(f"adopted {len(entries)} existing entries of {app_dir} into {backing}")
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        dest = layout.stray_root / stamp / str(layout.index)
        dest.mkdir(parents=True, exist_ok=True)
        for e in entries:
            shutil.move(app_dir / e, dest / e)
        notes.append(
            f"moved {len(entries)} entries written in {app_dir} while it was not replicated"
            f" to {dest}"
        )
    os.sync()
    return notes


class _Out:
    def __init__(self) -> None:
        self.broken = False

    def send(self, obj: dict[str, Any]) -> None:
        if self.broken:
            return
        try:
            sys.stdout.write(json.dumps(obj, default=str) + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, OSError):
            self.broken = True


async def run_child(  # noqa: PLR0915 - one place for the whole child protocol
    role: str, cluster: ClusterConfig, module: ModuleConfig, index: int
) -> int:
    from ha_runtime.replication.context import Event  # noqa: PLC0415
    from ha_runtime.replication.link.framing import LinkLost  # noqa: PLC0415
    from ha_runtime.replication.service import ReplicationService  # noqa: PLC0415

    out = _Out()

    def on_event(ev: Event) -> None:
        out.send({"type": "event", "kind": ev.kind, "detail": ev.detail})

    def fence(token: str, declared: str | None) -> None:
        out.send({"type": "status", "status": svc.status().as_dict()})
        out.send({"type": "fence", "token": token, "declared": declared})

    settings = module.replication.for_dir(index)
    svc = ReplicationService(
        module, cluster, settings, on_event=on_event, dir_index=index, fence=fence
    )
    for note in prepare_dirs(svc.layout):
        log.warning("%s: %s", module.name, note)
        out.send({"type": "event", "kind": "directory_prepared", "detail": {"note": note}})
    stop = trio.Event()

    async def status_loop() -> None:
        while True:
            out.send({"type": "status", "status": svc.status().as_dict()})
            await trio.sleep(STATUS_PERIOD_S)

    async def commands() -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        async for req in json_objects(stdin):
            nursery.start_soon(one, req)
        stop.set()  # the daemon closed our stdin: it is gone or stopping us

    async def one(req: dict[str, Any]) -> None:
        cmd = req.get("cmd")
        if cmd == "stop":
            stop.set()
        elif cmd == "generation":
            await svc.set_generation(str(req.get("value")))
        elif cmd == "fenced":
            svc.fenced(str(req.get("token")))
        elif cmd == "resync":
            svc.request_resync(full=bool(req.get("full")), quarantine=False)
            out.send({"type": "reply", "id": req.get("id"), "result": "resync requested"})
        elif cmd == "verify":
            try:
                rep = await svc.verify()
                out.send(
                    {
                        "type": "reply",
                        "id": req.get("id"),
                        "result": {
                            "equal": rep.equal,
                            "files": rep.files,
                            "differences": rep.differences,
                        },
                    }
                )
            except (LinkLost, OSError) as e:
                out.send({"type": "reply", "id": req.get("id"), "error": str(e)})

    async def signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _ in sigs:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commands)
        nursery.start_soon(signals)
        runner = svc.run_primary if role == "primary" else svc.run_secondary
        await nursery.start(runner)
        out.send({"type": "started", "dir": str(svc.app_dir), "backing": str(svc.backing)})
        nursery.start_soon(status_loop)
        await stop.wait()
        if role == "primary":
            drained = await svc.drain(settings.timeout_s)
            out.send({"type": "event", "kind": "drained", "detail": {"ok": drained}})
        nursery.cancel_scope.cancel()
    out.send({"type": "status", "status": svc.status().as_dict()})
    return 0


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> None:
    """Let glibc reuse freed memory instead of returning it to the kernel. Every record of
    up to a MiB is a fresh buffer (read from FUSE, framed, sent; received, decoded,
    written); served by new mmaps (glibc's default above 128 KiB), each buffer pays its page
    faults again, and a page fault is dear in a virtual machine (measured on the lab's VM:
    copying a MiB 2.6 ms into fresh memory, 0.3 ms into reused memory)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # not glibc
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # the largest glibc accepts; frames are below it
    mallopt(M_TRIM_THRESHOLD, 64 << 20)  # keep up to a full send queue of freed memory


def setup_logging(role: str, module: str, index: int) -> None:
    # stderr is inherited from the daemon: under systemd it is the unit's journal stream.
    fmt = f"%(levelname)s replicate[{module}/{index} {role}] %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, handlers=[stderr_handler(fmt)])


def await_role() -> str | None:
    """A spare (`hactl replicate spare MODULE --dir N`): import what either role runs, then
    block until the daemon's first line, ``{"cmd": "role", "role": "primary"|"secondary"}``.

    The daemon starts a spare ahead of need, so that a switchover or a failover does not
    wait for a new interpreter to import the runtime (0.4-1 s of CPU on a 2-vCPU node).
    Returns the role, or None when stdin closed first (the daemon stopped or dropped it).
    Raises ValueError on any other line."""
    importer = threading.Thread(target=import_idle, name="spare-import", daemon=True)
    importer.start()
    line = _read_line(0)
    if not line:
        return None
    try:
        req = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"spare: the first line is not JSON: {line[:80]!r}") from exc
    role = req.get("role") if isinstance(req, dict) and req.get("cmd") == "role" else None
    if role not in ("primary", "secondary"):
        raise ValueError(
            f'spare: expected {{"cmd": "role", "role": "primary"|"secondary"}}, got {line[:80]!r}'
        )
    # Normally long done: a spare is started seconds ahead of need. On a node whose CPU is
    # taken, an idle-priority import may hardly progress, and the main thread could not
    # raise it: start over as a fresh child of the role, at ordinary priority (same pid,
    # same pipes; the role line is already read).
    importer.join(IMPORT_WAIT_S)
    if importer.is_alive():
        argv = role_argv(sys.orig_argv, str(role))
        os.execv(argv[0], argv)
    return str(role)


def role_argv(argv: list[str], role: str) -> list[str]:
    """The spare's command line, `hactl replicate spare ...`, as that of `role`."""
    at = argv.index("replicate") + 1
    if argv[at] != "spare":
        raise ValueError(f"not a spare's command line: {argv!r}")
    return [sys.executable, *argv[1:at], role, *argv[at + 1 :]]


def import_idle() -> None:
    """Import what either role runs, in a thread of its own at SCHED_IDLE.

    A spare is started again right after one is used, which is when this node promotes or
    demotes and its application starts: imports at ordinary priority took their 0.4-1 s of
    CPU from that start (the upgrade scenario's 2-3 s gaps, on a loaded node). At SCHED_IDLE
    they take only CPU time nothing else wants. The policy is the thread's alone (Linux
    schedules threads): the main thread, and every thread it starts once the role arrives,
    keep the ordinary policy, which an unprivileged process could not get back."""
    with contextlib.suppress(OSError):  # not allowed here: import at ordinary priority
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    import ha_runtime.replication.service  # noqa: F401, PLC0415 - the point of a spare


def _read_line(fd: int) -> bytes:
    """One line from fd, byte by byte: what follows it stays in the pipe for the child's
    command reader (a buffered read could swallow the daemon's next command)."""
    out = bytearray()
    while True:
        b = os.read(fd, 1)
        if not b or b == b"\n":
            return bytes(out)
        out += b


def main(role: str, cluster: ClusterConfig, module: ModuleConfig, index: int) -> NoReturn:
    keep_freed_memory()
    setup_logging(role, module.name, index)
    code = 1
    with contextlib.suppress(KeyboardInterrupt):
        code = trio.run(run_child, role, cluster, module, index)
    exit_at_once(code)


def exit_at_once(code: int) -> NoReturn:
    """End the process without the interpreter's finalization.

    The daemon waits for a child's exit before it promotes or demotes the node, while the
    application is down. Tearing down the runtime's modules and objects took 160 ms of that
    on an idle lab node and 0.5-0.9 s on a loaded one (the upgrade scenario). What the
    child keeps is written through file descriptors, and fsynced where it must be; only
    Python's own buffers are left to flush."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
