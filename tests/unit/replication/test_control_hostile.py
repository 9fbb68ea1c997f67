"""The secondary's control handlers against a copy its peer made hostile.

The peer writes the secondary's backing directory: it can plant symlinked directories
(``a -> /etc``), FIFOs, 10 000-level trees, names that are not UTF-8, and send control
requests with any fields. Whatever it does, the real handler (``Secondary.control``
with a real ``Applier``) reads and writes nothing outside the backing root, answers every
request with a well-formed reply, and never raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ha_runtime.config import ReplicationSettings
from ha_runtime.replication import beneath, tree
from ha_runtime.replication import delta as D
from ha_runtime.replication.journal import DELTA_MORE, Op, Record
from ha_runtime.replication.resync.progress import Progress
from ha_runtime.replication.resync.send import read_small, send_ranges
from ha_runtime.replication.secondary.applier import Applier
from ha_runtime.replication.service import ReplicationService
from tests.sitefactory import replication_cluster, replication_module

SECRET = b"SECRET-outside-the-replica-4f1d"


class Setup:
    """A secondary's service and applier on a tmp dir, and a sentinel tree outside it."""

    def __init__(self, tmp: Path) -> None:
        cluster = replication_cluster(tmp, "node2", state_dir=tmp / "state")
        module = replication_module(tmp, cluster)
        settings = ReplicationSettings(backing_root=tmp / "replica", site_key=b"k" * 48)
        self.events: list[Any] = []
        self.svc = ReplicationService(module, cluster, settings, on_event=self.events.append)
        self.svc.backing.mkdir(parents=True)
        self.backing = self.svc.backing
        self.applier = Applier(self.backing)
        self.outside = tmp / "outside"
        (self.outside / "target").mkdir(parents=True)
        (self.outside / "secret").write_bytes(SECRET)
        (self.outside / "target" / "secret").write_bytes(SECRET)
        self.before = self.sentinel()

    def sentinel(self) -> dict[str, tuple[int, int, bytes]]:
        out = {".": (os.lstat(self.outside).st_mtime_ns, 0, b"")}
        for dirpath, dirs, files in os.walk(self.outside):
            for n in dirs + files:
                p = Path(dirpath, n)
                s = p.lstat()
                data = p.read_bytes() if stat.S_ISREG(s.st_mode) else b""
                out[str(p.relative_to(self.outside))] = (s.st_mtime_ns, s.st_mode, data)
        return out

    def control(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        reply, body = trio.run(self.svc.secondary.control, self.applier, obj)
        # Well-formed: a dict the transport can encode (JSON), bytes for the body.
        assert isinstance(reply, dict) and isinstance(body, bytes)
        json.dumps(reply)
        assert SECRET not in json.dumps(reply).encode() and SECRET not in body
        return reply, body

    def check_outside(self) -> None:
        assert self.sentinel() == self.before
        # Nothing copied out of the sentinel into the quarantine either.
        # (grep -r: no symlink followed, no recursion limit on a deep quarantine)
        q = self.svc.layout.quarantine_root
        if q.exists():
            found = subprocess.run(["grep", "-rlF", SECRET.decode(), str(q)],
                                   capture_output=True, check=False)  # fmt: skip
            assert found.returncode == 1, found.stdout

    def close(self) -> None:
        self.applier.close()


@contextlib.contextmanager
def _tmpfs(at: Path, size: str) -> Iterator[None]:
    """A small file system of its own at ``at`` for the test (lazily unmounted after,
    even while something still holds it open)."""
    at.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(at)]
    if subprocess.run(cmd, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(at)], check=True)


@pytest.fixture
def s(tmp_path: Path) -> Any:
    setup = Setup(tmp_path)
    yield setup
    setup.close()


def test_quarantine_never_reads_through_a_symlinked_directory(s: Setup) -> None:
    (s.backing / "a").symlink_to(s.outside)
    (s.backing / "b").symlink_to(s.outside / "target")
    (s.backing / "real").mkdir()
    (s.backing / "real" / "f").write_bytes(b"ours")
    reply, _ = s.control({"op": "quarantine", "paths": ["a/secret", "b", "b/secret", "a/target",
                                                         "real", "real/f"]})  # fmt: skip
    dest = Path(reply["directory"])
    s.check_outside()
    # The symlink itself is kept (as a symlink), the real file is copied.
    assert os.readlink(dest / "b") == str(s.outside / "target")
    assert (dest / "real" / "f").read_bytes() == b"ours"
    assert not (dest / "a").exists() or (dest / "a").is_symlink()


def test_quarantine_never_writes_through_a_copied_symlink(s: Setup) -> None:
    # "l" is copied first (as a symlink to the sentinel), then "l/secret": resolved in the
    # quarantine through that symlink, the copy would land outside.
    (s.backing / "l").symlink_to(s.outside / "target")
    reply, _ = s.control({"op": "quarantine", "paths": ["l", "l/secret", "l/new"]})
    s.check_outside()
    assert not (s.outside / "target" / "new").exists()
    assert os.listdir(reply["directory"]) == ["l"]
    assert os.readlink(Path(reply["directory"], "l")) == str(s.outside / "target")


def test_a_quarantine_that_cannot_save_everything_says_so(s: Setup) -> None:
    # The primary must not overwrite what its peer could not put aside (here: disk full).
    with _tmpfs(s.svc.layout.quarantine_root, "1m"):
        (s.backing / "big").write_bytes(os.urandom(3 << 20))
        (s.backing / "small").write_bytes(b"small")
        reply, _ = s.control({"op": "quarantine", "paths": ["small", "big"]})
        assert "error" in reply and "big" in reply["error"], reply
        assert reply["copied"] == 1
        assert Path(reply["directory"], "small").read_bytes() == b"small"
        assert not Path(reply["directory"], "big").exists()  # no part of it


def test_sig_and_digest_never_read_through_a_symlinked_directory(s: Setup) -> None:
    (s.backing / "a").symlink_to(s.outside)
    reply, body = s.control({"op": "sig", "path": "a/secret"})
    assert "error" in reply and body == b""
    reply, _ = s.control({"op": "digest", "paths": ["a/secret", "a/target/secret", "a"]})
    assert set(reply["digests"]) <= {"a"}
    assert reply["digests"].get("a", "l:").startswith("l:")
    reply, _ = s.control({"op": "digest"})
    assert list(reply["digests"]) == ["a"]
    reply, _ = s.control({"op": "list", "paths": ["a/target", "a/secret", "a"]})
    assert list(reply["tree"]) == ["a"]
    s.check_outside()


def test_sig_of_a_fifo_answers_at_once(s: Setup) -> None:
    os.mkfifo(s.backing / "fifo")
    reply, body = s.control({"op": "sig", "path": "fifo"})
    assert "error" in reply and body == b""
    reply, _ = s.control({"op": "digest", "paths": ["fifo"]})
    assert reply["digests"]["fifo"].startswith("m:")


def test_delta_over_a_fifo_does_not_block_the_applier(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    os.mkfifo(root / "f")
    applier = Applier(root)
    d = D.delta(D.signature(b""), b"new content")
    failed: list[BaseException] = []

    def run() -> None:
        try:
            applier.apply(Record(1, Op.DELTA, b"f", data=d.encode()))
        except OSError as e:
            failed.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    blocked = t.is_alive()
    if blocked:  # release the worker: a writer opens the FIFO
        os.close(os.open(root / "f", os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
    applier.close()
    assert not blocked, "a FIFO as the delta's basis blocked the applier"


def _returns_within(seconds: float, fn: Any, release: Path) -> bool:
    """Run ``fn`` in a thread; False if it is still blocked after ``seconds`` (it is then
    released by a writer opening the FIFO ``release``)."""

    def run() -> None:
        with contextlib.suppress(OSError):
            fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if not t.is_alive():
        return True
    os.close(os.open(release, os.O_WRONLY | os.O_NONBLOCK))
    t.join(5)
    return False


def test_the_primary_s_resync_readers_never_wait_on_a_fifo(tmp_path: Path) -> None:
    # The application made a FIFO where a file was, between the listing and the read.
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    blocked = []
    if not _returns_within(5, lambda: read_small(os.fsencode(fifo)), fifo):
        blocked.append("_read")

    async def send() -> None:
        # (no link: a FIFO has nothing to send, nothing may be queued)
        await send_ranges(None, tmp_path, b"f", [(0, 100)], Progress())  # type: ignore[arg-type]

    if not _returns_within(5, lambda: trio.run(send), fifo):
        blocked.append("_send_ranges")
    assert not blocked, f"blocked on a FIFO: {blocked}"


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named"])
def test_temp_file_never_replaces_an_application_file(tmp_path: Path, tmpfile: bool) -> None:
    # named: a file system without O_TMPFILE (the name is taken in the staging directory)
    root = tmp_path / "r"
    root.mkdir()
    (root / "f").write_bytes(b"old")
    (root / ".hapair-tmp.f").write_bytes(b"the application's own file")
    applier = Applier(root)
    applier._staging.tmpfile = tmpfile
    applier.apply(Record(1, Op.REPLACE, b"f", data=b"new"))
    d = D.delta(D.signature(b"new"), b"newer and longer")
    applier.apply(Record(2, Op.DELTA, b"f", flags=DELTA_MORE, data=d.encode()))
    assert (root / ".hapair-tmp.f").read_bytes() == b"the application's own file"
    # A delta left half-way (the primary went away) leaves nothing in the tree.
    assert sorted(tree.list_tree(root)) == [".hapair-tmp.f", "f"]
    assert sorted(os.listdir(root)) == [".hapair-tmp.f", "f"]
    applier.apply(Record(3, Op.DELTA, b"f", data=d.encode()))
    applier.barrier()
    applier.close()
    assert (root / "f").read_bytes() == b"newer and longer"
    assert sorted(os.listdir(root)) == [".hapair-tmp.f", "f"]


def test_a_replace_after_a_delta_cut_short_is_the_whole_file(tmp_path: Path) -> None:
    # A full resync cut short after a first delta piece; the next one sends the (now small)
    # file whole: it must not land after the abandoned piece's output.
    root = tmp_path / "r"
    root.mkdir()
    (root / "f").write_bytes(b"old")
    applier = Applier(root)
    d = D.delta(D.signature(b"old"), b"newer and longer")
    applier.apply(Record(1, Op.DELTA, b"f", flags=DELTA_MORE, data=d.encode()))
    applier.apply(Record(2, Op.CREATE, b"f", mode=0o100644))
    applier.apply(Record(3, Op.REPLACE, b"f", data=b"final"))
    applier.barrier()
    applier.close()
    assert (root / "f").read_bytes() == b"final"


@pytest.fixture(params=["openat2", "components"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways ``beneath`` resolves a path: openat2, and the component walk of kernels
    without it."""
    if request.param == "components":
        monkeypatch.setattr(beneath, "_have_openat2", False)
    return str(request.param)


def test_open_dir_refuses_symlinks_and_dots_either_way(tmp_path: Path, resolver: str) -> None:
    root = tmp_path / "r"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "l").symlink_to(root / "a" / "b")
    (root / "a" / "f").write_bytes(b"")
    deep = b"/".join([b"x" * 200] * 25)  # longer than PATH_MAX: openat2 cannot
    os.makedirs(os.fsencode(root) + b"/" + deep[:3000])
    rfd = os.open(root, beneath.DIR_FLAGS)
    try:
        if resolver == "openat2":  # this kernel has it: the one-syscall path is the one tested
            fd2 = beneath._openat2_dir(rfd, b"a/b")
            assert fd2 is not None
            os.close(fd2)
        fd = beneath.open_dir(rfd, b"a/b")
        assert os.fstat(fd).st_ino == os.stat(root / "a" / "b").st_ino
        os.close(fd)
        for bad in (b"a/l", b"a/l/x", b"a/f"):
            with pytest.raises(NotADirectoryError):
                beneath.open_dir(rfd, bad)
        for unsafe in (b"..", b"a/../..", b"/etc", b"a/./b", b"a//b", b"a\0b"):
            with pytest.raises(beneath.UnsafePath):
                beneath.open_dir(rfd, unsafe)
        with pytest.raises(FileNotFoundError):
            beneath.open_dir(rfd, b"a/missing")
        pfd, name = beneath.open_parent(rfd, b"a/b/c")
        assert name == b"c" and os.fstat(pfd).st_ino == os.stat(root / "a" / "b").st_ino
        os.close(pfd)
        # A path no record can name (over 4096 bytes) is refused; one just under it opens.
        with pytest.raises(beneath.UnsafePath):
            beneath.open_dir(rfd, deep)
        fd = beneath.open_dir(rfd, deep[: deep.rfind(b"/", 0, 3000)])
        os.close(fd)
        # Exactly 4096 bytes: a record can name it, openat2 cannot (PATH_MAX counts the NUL).
        longest = [bytes([0x61 + i]) * 240 for i in range(17)]
        fd = os.dup(rfd)
        for c in longest:
            os.mkdir(c, dir_fd=fd)
            nfd = os.open(c, beneath.DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ino = os.fstat(fd).st_ino
        os.close(fd)
        rel = b"/".join(longest)
        assert len(rel) == 4096
        assert beneath._openat2_dir(rfd, rel) is None  # ENAMETOOLONG: the component walk
        fd = beneath.open_dir(rfd, rel)
        assert os.fstat(fd).st_ino == ino
        os.close(fd)
    finally:
        os.close(rfd)


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named"])
def test_temp_files_on_a_backing_root_of_its_own(tmp_path: Path, tmpfile: bool) -> None:
    # A root that is a mount point has no staging directory on its file system: the name
    # is taken in the file's own directory, exclusively, and nothing is left behind.
    root = tmp_path / "r"
    with _tmpfs(root, "4m"):
        (root / "f").write_bytes(b"old")
        (root / ".hapair-tmp.f").write_bytes(b"app")
        applier = Applier(root)
        assert applier._staging.dir_fd is None
        applier._staging.tmpfile = tmpfile
        d = D.delta(D.signature(b"old"), b"old and new")
        applier.apply(Record(1, Op.DELTA, b"f", flags=DELTA_MORE, data=d.encode()))
        if tmpfile:  # (named: the file being built has its name in the tree meanwhile)
            assert sorted(os.listdir(root)) == [".hapair-tmp.f", "f"]
        applier.apply(Record(2, Op.DELTA, b"f", data=d.encode()))
        applier.apply(Record(3, Op.REPLACE, b"g", data=b"g"))
        applier.barrier()
        applier.close()
        assert (root / "f").read_bytes() == b"old and new"
        assert (root / ".hapair-tmp.f").read_bytes() == b"app"
        assert sorted(os.listdir(root)) == [".hapair-tmp.f", "f", "g"]


def _nested(levels: int) -> list[Any]:
    v: list[Any] = []
    for _ in range(levels):
        v = [v]
    return v


BAD_REQUESTS: list[dict[str, Any]] = [
    {"op": _nested(10_000)},
    {"op": "hello", "module": _nested(10_000)},
    {"op": "list", "paths": _nested(10_000)},
    {"op": "in_sync", "generation": _nested(10_000)},
    {},
    {"op": None},
    {"op": ["hello"]},
    {"op": "hello"},
    {"op": "hello", "module": {"x": [1] * 1000}},
    {"op": "in_sync"},
    {"op": "in_sync", "generation": {"a": 1}},
    {"op": "in_sync", "generation": "0" * 100_000},
    {"op": "in_sync", "generation": "../../etc\n"},
    {"op": "list", "paths": "abc"},
    {"op": "list", "paths": [None, 1, {"a": 1}, "..", "/etc", "a/../..", "a\x00b", "x" * 5000]},
    {"op": "list", "paths": ["\udcff\udcfe", "\ud800"]},
    {"op": "digest", "paths": 7},
    {"op": "digest", "paths": [["nested"], "..", "/", "", "\ud800", "a/" * 3000]},
    {"op": "digest", "paths": ["x"] * 100_000},
    {"op": "sig"},
    {"op": "sig", "path": None},
    {"op": "sig", "path": ["a"]},
    {"op": "sig", "path": "/etc/passwd"},
    {"op": "sig", "path": "../outside/secret"},
    {"op": "sig", "path": "\ud800"},
    {"op": "sig", "path": "a\x00"},
    {"op": "quarantine"},
    {"op": "quarantine", "paths": 5},
    {"op": "quarantine", "paths": "abc"},
    {"op": "quarantine", "paths": [None, "..", "/etc/passwd", "\ud800", "a\x00", 3]},
    {"op": "nope"},
]


@pytest.mark.parametrize("obj", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_hostile_requests_get_a_reply_never_an_exception(s: Setup, obj: dict[str, Any]) -> None:
    (s.backing / "a").symlink_to(s.outside)
    s.control(obj)
    s.check_outside()
    # An in_sync that was refused wrote no marker.
    if obj.get("op") == "in_sync":
        assert not s.svc.layout.synced.exists()


def _deep(root: Path, levels: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def _rm_deep(p: Path) -> None:
    """Remove trees holding chains of "d" directories: pytest's own clean-up recurses
    (RecursionError on such a tree) and rm takes seconds; cut into short chains first."""
    for dirpath, dirs, _ in os.walk(p):
        if "d" in dirs:
            _cut_chain(Path(dirpath))
            dirs.clear()
    subprocess.run(["rm", "-rf", "--", str(p)], check=True)


def _cut_chain(top: Path) -> None:
    top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.dup(top_fd)
    level = 0
    try:
        while True:
            try:
                nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                break
            level += 1
            if level % 200 == 0:
                os.rename("d", f"cut{level}", src_dir_fd=fd, dst_dir_fd=top_fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
        os.close(top_fd)


def test_a_10000_level_tree_is_answered(tmp_path: Path) -> None:
    # On a tmpfs of its own when possible: removing 12 000 directories from the disk took
    # longer than the test (and pytest's own clean-up recurses: RecursionError).
    try:
        with _tmpfs(tmp_path / "replica", "64m"):
            s = Setup(tmp_path)
            try:
                _a_10000_level_tree_is_answered(s)
            finally:
                s.close()
    except pytest.skip.Exception:
        s = Setup(tmp_path)
        try:
            _a_10000_level_tree_is_answered(s)
        finally:
            s.close()
            _rm_deep(tmp_path / "replica")


def _a_10000_level_tree_is_answered(s: Setup) -> None:
    _deep(s.backing, 10_000)
    for obj in ({"op": "list"}, {"op": "digest"}, {"op": "quarantine", "paths": ["d"]},
                {"op": "list", "paths": ["d"]}):  # fmt: skip
        reply, _ = s.control(obj)
        assert "error" not in reply, reply
    reply, _ = s.control({"op": "list"})
    # Only what a record can name (MAX_PATH) is listed: 2048 levels of "d/".
    assert max(len(p) for p in reply["tree"]) <= 4096
    assert len(reply["tree"]) == 2048
    s.check_outside()


@pytest.mark.parametrize("keep", [1, 2, 64])
def test_walk_with_few_descriptors_sees_what_os_walk_sees(tmp_path: Path, keep: int) -> None:
    root = tmp_path / "r"
    for p in ("a/b/c/d", "a/b/x", "a/y/z", "e", "a/b/c/d/e/f"):
        (root / p).mkdir(parents=True)
        (root / p / "file").write_bytes(b"x")
    (root / "a" / "link").symlink_to(tmp_path)
    expected = set()
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            expected.add(os.fsencode(Path(dirpath, n).relative_to(root)))
    before = len(os.listdir("/proc/self/fd"))
    rfd = os.open(root, beneath.DIR_FLAGS)
    try:
        seen = set()
        for rel, st_, dfd, name in beneath.walk(rfd, keep=keep):
            seen.add(rel)
            assert os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino == st_.st_ino
            assert len(os.listdir("/proc/self/fd")) <= before + keep + 2
        assert seen == expected
        # A lookup going back up and down again reopens what it closed.
        dp = beneath.DirPath(rfd, keep)
        for rel in (b"a/b/c/d/e/f", b"a/y/z", b"a/b/c/d/e/f", b"a/b", b"", b"a/b/c"):
            assert os.fstat(dp.fd(rel)).st_ino == os.stat(root / os.fsdecode(rel)).st_ino
        with pytest.raises(NotADirectoryError):
            dp.fd(b"a/link")
        dp.close()
    finally:
        os.close(rfd)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_directory_swapped_for_a_symlink_during_the_requests(s: Setup) -> None:
    """A peer's records keep replacing directory "a" (holding a file) by a symlink out of
    the tree and back while the handlers walk and read it: whatever they see, they never
    read, list or copy anything of the sentinel."""
    a, old = s.backing / "a", s.backing / "a.real"
    old.mkdir()
    for i in range(20):
        (old / f"f{i}").write_bytes(b"inside")
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        while not stop.is_set():
            old.rename(a)
            a.rename(old)
            a.symlink_to(s.outside)
            a.unlink()
            swaps[0] += 1

    t = threading.Thread(target=swapper)
    t.start()
    try:
        for _ in range(30):
            for obj in ({"op": "list"}, {"op": "digest"},
                        {"op": "digest", "paths": ["a/f1", "a/secret", "a/target/secret"]},
                        {"op": "sig", "path": "a/secret"}, {"op": "list", "paths": ["a"]},
                        {"op": "quarantine", "paths": ["a", "a/secret", "a/f1"]}):  # fmt: skip
                reply, _ = s.control(obj)
                assert not any("secret" in k for k in reply.get("tree", {}))
                assert not any("secret" in k for k in reply.get("digests", {}))
    finally:
        stop.set()
        t.join()
    assert swaps[0] > 0
    s.check_outside()


# --------------------------------------------------------------------------- hypothesis

NAMES = st.sampled_from(
    [b"a", b"b", b"d", b"\xff\xfe", b"caf\xc3\xa9", b" ", b"-n", b".hidden", b"x" * 255,
     b"new\nline", b".hapair-tmp.a"]
)  # fmt: skip
KINDS = st.sampled_from(["file", "dir", "link_out", "link_out_dir", "link_in", "fifo", "deep"])
TREE = st.lists(st.tuples(st.lists(NAMES, min_size=1, max_size=3), KINDS), max_size=12)
IDS = st.sampled_from([0, 1, 65534, 2**31 - 1, 2**31, 2**32 - 2])


def _build(s: Setup, tree: list[tuple[list[bytes], str]], uid: int) -> list[bytes]:
    base = os.fsencode(s.backing)
    made: list[bytes] = []
    for parts, kind in tree:
        rel = b"/".join(parts)
        p = base + b"/" + rel
        if not _real_dirs(base, parts[:-1]) or os.path.lexists(p):
            continue  # only build inside real directories: never touch the sentinel
        if kind == "file":
            with open(p, "wb") as f:
                f.write(b"data " + rel)
        elif kind == "dir":
            os.mkdir(p)
        elif kind == "link_out":
            os.symlink(os.fsencode(s.outside / "secret"), p)
        elif kind == "link_out_dir":
            os.symlink(os.fsencode(s.outside), p)
        elif kind == "link_in":
            os.symlink(b"../" * 3 + b"a", p)
        elif kind == "fifo":
            os.mkfifo(p)
        else:
            os.mkdir(p)
            _deep(Path(os.fsdecode(p)), 40)
        os.chown(p, uid, uid, follow_symlinks=False)
        made.append(rel)
    return made


def _real_dirs(base: bytes, parts: list[bytes]) -> bool:
    """Make the directories ``parts`` under base where missing; False if one of them is
    something else (a symlink above all: the sentinel is never built into)."""
    p = base
    for c in parts:
        p += b"/" + c
        if not os.path.lexists(p):
            os.mkdir(p)
        elif os.path.islink(p) or not os.path.isdir(p):
            return False
    return True


REQUEST = st.sampled_from(["sig", "digest", "digest_paths", "list", "list_paths", "quarantine",
                           "in_sync", "hello", "retype"])  # fmt: skip


def _retype(s: Setup, made: list[bytes]) -> None:
    """Change the type of what was built (as a peer's records would): a directory becomes
    a symlink out of the tree, a file a directory, anything else a file."""
    base = os.fsencode(s.backing)
    for i, rel in enumerate(made):
        p = base + b"/" + rel
        try:
            st_ = os.lstat(p)
        except OSError:
            continue  # under something retyped already
        if stat.S_ISDIR(st_.st_mode):
            os.rename(p, base + b"/old%d.%d" % (i, time.monotonic_ns()))
            os.symlink(os.fsencode(s.outside), p)
        elif stat.S_ISREG(st_.st_mode):
            os.unlink(p)
            os.mkdir(p)
        else:
            os.unlink(p)
            with open(p, "wb") as f:
                f.write(b"retyped")


ODD = ["/", "..", ".", "a/../b", "\x00", "\udcff\udcfe", "\ud800", "a", "d/f", "a/secret"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=30) | st.sampled_from(ODD),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip
OPS = st.sampled_from(["hello", "in_sync", "list", "digest", "sig", "quarantine"]) | JSON


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    op=OPS,
    fields=st.dictionaries(
        st.sampled_from(["path", "paths", "module", "generation", "untagged"]),
        JSON | st.lists(st.sampled_from(ODD) | JSON, max_size=5),
        min_size=1,
    ),
)
def test_any_request_gets_a_well_formed_reply(
    tmp_path_factory: pytest.TempPathFactory, op: Any, fields: dict[str, Any]
) -> None:  # fmt: skip
    s = Setup(tmp_path_factory.mktemp("r"))
    try:
        (s.backing / "a").symlink_to(s.outside)
        (s.backing / "d").mkdir()
        (s.backing / "d" / "f").write_bytes(b"inside")
        reply, _ = s.control({"op": op, **fields})
        if op not in ("hello", "list", "digest", "sig", "quarantine", "in_sync"):
            assert "error" in reply
        s.check_outside()
    finally:
        s.close()
