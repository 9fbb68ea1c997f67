"""A third-party POSIX file-system suite through the primary's replicated directory.

stress-ng (Debian 12's package, a recognised kernel/file-system stress and regression
tool) runs its file-system stressors one after the other, with `--verify` where the
stressor has it, in a directory inside the primary's FUSE mount of flightdata's
replicated directory; every write, rename, link, chmod, xattr, lock ... goes through the
replication as an application's would. Each stressor must end successfully; then
`verify_resync.yml` (run as an operator runs it) must find both copies identical, once
after the suite (the stressors remove their own files) and once after its directory is
removed.

stress-ng runs on the lab host, in the primary's tree seen through /proc/<its init>/root: the
node image does not carry it, and the mount it reaches is the node's own (asserted).
pjdfstest, fsx and fsstress are not packaged by Debian 12, and fetched code may not be
built by the project, hence stress-ng.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from labcmd import in_node
from repl import APP_DIR, MODULE, in_sync_pair
from siteplay import run_playbook

from ha_lab.lab import Lab

SUITE_DIR = "posix-suite"
SECONDS_EACH = 3
# Files small enough that a stressor turns over many operations in its few seconds (each
# write crosses the replication link before it returns) and the verification is quick.
SIZES = (
    "--hdd-bytes=4M",
    "--iomix-bytes=4M",
    "--readahead-bytes=4M",
    "--seek-size=4M",
    "--fallocate-bytes=4M",
    "--sync-file-bytes=4M",
    "--revio-bytes=4M",
    "--dirdeep-dirs=1",
)
# stress-ng's "filesystem" and "io" classes, minus the excluded ones below.
STRESSORS = (
    "access",
    "chdir",
    "chmod",
    "chown",
    "copy-file",
    "dentry",
    "dir",
    "dirdeep",
    "dirmany",
    "fallocate",
    "fcntl",
    "fiemap",
    "filename",
    "flock",
    "fpunch",
    "fstat",
    "getdent",
    "hdd",
    "io",
    "iomix",
    "link",
    "locka",
    "lockf",
    "lockofd",
    "mknod",
    "open",
    "readahead",
    "rename",
    "revio",
    "seek",
    "symlink",
    "sync-file",
    "touch",
    "utime",
    "xattr",
)
# What is left out, and why: none of these exercises what a replicated directory holds.
EXCLUDED = {
    # RLIMIT_FSIZE is the writer's limit: the kernel applies it to write() before the
    # request reaches FUSE, but not to fallocate(), which FUSE forwards to the server (our
    # process, not the writer): the stressor's "fallocate past the limit gets EFBIG" check
    # fails on any FUSE file system. Its writes were checked (no other failure).
    "fsize": "RLIMIT_FSIZE is not applied to fallocate on FUSE (a kernel FUSE limit)",
    "bind-mount": "mounts, does not touch files",
    "binderfs": "mounts Android binderfs",
    "chattr": "ext2/4 inode-flag ioctls (FS_IOC_SETFLAGS), not forwarded by FUSE",
    "inode-flags": "the same ext4 ioctls as chattr",
    "file-ioctl": "FIFREEZE/FIBMAP and the like: block-device file-system ioctls",
    "verity": "fs-verity ioctls, an ext4/f2fs feature",
    "handle": "name_to_handle_at: needs NFS-export support of the file system",
    "lease": "F_SETLEASE: the kernel refuses leases on FUSE files",
    "dnotify": "watches change notifications, not file-system state",
    "inotify": "watches change notifications, not file-system state",
    "fanotify": "watches change notifications on whole mounts",
    "procfs": "reads /proc",
    "dup": "file-descriptor table only",
    "eventfd": "no file involved",
    "ioprio": "I/O scheduler priorities of the process",
    "rawdev": "raw block device",
    "aio": "kernel AIO scheduling, the same writes as io/hdd",
    "aiol": "kernel AIO scheduling, the same writes as io/hdd",
    "io-uring": "io_uring scheduling, the same writes as io/hdd",
}


@dataclass(frozen=True)
class StressorRun:
    name: str
    rc: int
    seconds: float
    failures: list[str]


def _fuse_mount_of(init: int) -> str:
    """The fstype of APP_DIR in the node's mount namespace (from its mountinfo)."""
    for line in Path(f"/proc/{init}/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[4] == APP_DIR:
            return fields[sep + 1]
    return ""


def _run_stressor(name: str, where: Path) -> StressorRun:
    argv = ["stress-ng", f"--{name}", "1", "-t", str(SECONDS_EACH), "--verify"]
    argv += [*SIZES, "--temp-path", str(where)]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    failures = [line for line in out.splitlines() if " fail: " in line]
    return StressorRun(name, proc.returncode, time.monotonic() - started, failures)


def _verify_resync() -> str:
    result = run_playbook("playbooks/verify_resync.yml", extravars={"module": MODULE})
    return "identical" if result.status == "successful" else result.failure_summary()


def test_stress_ng_filesystem_suite_through_the_replica(mirror_site: Lab) -> None:
    assert not set(STRESSORS) & set(EXCLUDED)
    primary, _secondary = in_sync_pair()
    init = mirror_site.node(primary).init_pid()
    assert init is not None, f"{primary} is not running"
    fstype = _fuse_mount_of(init)
    assert fstype == "fuse.hapair", f"{APP_DIR} on {primary} is {fstype!r}, not the replica"
    in_node(mirror_site, primary, "rm", "-rf", f"{APP_DIR}/{SUITE_DIR}")
    proc = in_node(mirror_site, primary, "mkdir", f"{APP_DIR}/{SUITE_DIR}")
    assert proc.returncode == 0, proc.stderr
    where = Path(f"/proc/{init}/root{APP_DIR}/{SUITE_DIR}")

    runs = [_run_stressor(name, where) for name in STRESSORS]
    table = "\n".join(
        f"  {r.name:10} rc={r.rc} {r.seconds:5.1f} s {' | '.join(r.failures[:3])}" for r in runs
    )
    print(f"stress-ng {len(runs)} stressors on {primary}:{APP_DIR}/{SUITE_DIR}:\n{table}")
    # Both copies identical after the stressors removed their files (each removal, rename
    # and link crossed the replication too: a leftover on either side is a difference), then
    # after the test's own directory is gone; checked even when a stressor failed.
    # (--keep-files left too many entries to walk in the lab's time.)
    with_files = _verify_resync()
    proc = in_node(mirror_site, primary, "rm", "-rf", f"{APP_DIR}/{SUITE_DIR}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    emptied = _verify_resync()
    print(f"verify_resync.yml after the suite: {with_files}; after removing its dir: {emptied}")
    # stress-ng 0.15 exits 0 after some "fail:" lines: both count.
    bad = [r for r in runs if r.rc != 0 or r.failures]
    assert not bad, f"stressors failed through the replica:\n{table}"
    assert with_files == emptied == "identical"


def test_every_listed_stressor_exists() -> None:
    # A typo in either list would hide nothing and test nothing: each name is a stressor.
    out = subprocess.run(["stress-ng", "--help"], capture_output=True, text=True, check=True)
    unknown = [n for n in (*STRESSORS, *EXCLUDED) if f"--{n} N " not in out.stdout]
    assert not unknown, f"not stress-ng stressors: {unknown}"
