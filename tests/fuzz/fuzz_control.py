"""Coverage-guided fuzzing of the secondary's control handlers (``Secondary.control``
with a real ``Applier``) on a hostile copy: symlinks out of the tree to a sentinel, a FIFO,
names that are not UTF-8. The fuzzer's bytes choose the request's fields (any JSON
value, paths built of hostile parts). Every request gets a JSON-encodable reply, nothing of
the sentinel is read or changed. `python tests/fuzz/fuzz_control.py -runs=N`."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris
import trio

with atheris.instrument_imports(include=["ha_runtime"]):
    from ha_runtime.config import (
        ClusterConfig,
        HeartbeatSpec,
        ModuleConfig,
        NodeSpec,
        ReplicationSettings,
        RestartPolicy,
        ScriptsSpec,
        TlsSpec,
    )
    from ha_runtime.replication.secondary.applier import Applier
    from ha_runtime.replication.service import ReplicationService

SECRET = b"SECRET-outside-the-replica-9c2e"
# One fixed directory, emptied at start: libFuzzer exits without running atexit handlers.
TMP = Path(tempfile.gettempdir()) / "hapair-fuzz-control"
shutil.rmtree(TMP, ignore_errors=True)
TMP.mkdir()
OUTSIDE = TMP / "outside"


def _service() -> tuple[ReplicationService, Applier]:
    nodes = (NodeSpec("node1", {"lan": "127.0.0.1"}), NodeSpec("node2", {"lan": "127.0.0.1"}))
    cluster = ClusterConfig(
        path=TMP / "c.yml", node="node2", nodes=nodes, heartbeat_port=7440,
        site_key=TMP / "key", tls=TlsSpec(TMP / "ca", TMP / "crt", TMP / "k"),
        api_socket=TMP / "s", metrics_address=None, state_dir=TMP / "state", modules_dir=TMP,
    )  # fmt: skip
    module = ModuleConfig(
        path=TMP / "m.yml", name="demo", type="mirror", nodes=("node1", "node2"),
        default_primary="node1", failback="manual", vip=None, heartbeat=HeartbeatSpec(),
        witness=(), scripts=ScriptsSpec(), checkers=(), restart_policy=RestartPolicy(),
        replicated_dirs=(TMP / "app",),
    )  # fmt: skip
    svc = ReplicationService(
        module, cluster, ReplicationSettings(backing_root=TMP / "replica", site_key=b"k" * 48)
    )
    b = svc.backing
    (b / "d" / "e").mkdir(parents=True)
    (b / "d" / "f").write_bytes(b"inside")
    (b / "a").symlink_to(OUTSIDE)
    (b / "d" / "l").symlink_to(OUTSIDE / "secret")
    os.mkfifo(b / "fifo")
    (b / os.fsdecode(b"\xff\xfe")).write_bytes(b"odd name")
    return svc, Applier(b)


OUTSIDE.mkdir()
(OUTSIDE / "secret").write_bytes(SECRET)
SENTINEL = (os.stat(OUTSIDE).st_mtime_ns, os.stat(OUTSIDE / "secret").st_mtime_ns)
SVC, APPLIER = _service()


OPS = ["hello", "in_sync", "list", "digest", "sig", "nope"]
PARTS = ["a", "d", "e", "f", "l", "fifo", "secret", "..", ".", "", "\udcff\udcfe", "\ud800",
         "\x00", "x" * 300, "/"]  # fmt: skip


def _path(fdp: atheris.FuzzedDataProvider) -> str:
    if fdp.ConsumeBool():
        return fdp.ConsumeUnicode(40)
    n = fdp.ConsumeIntInRange(1, 6)
    return "/".join(PARTS[fdp.ConsumeIntInRange(0, len(PARTS) - 1)] for _ in range(n))


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    k = fdp.ConsumeIntInRange(0, 6)
    if k == 0:
        return _path(fdp)
    if k == 1:
        return fdp.ConsumeInt(8)
    if k == 2 and depth < 4:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 6))]
    if k == 3 and depth < 4:
        return {fdp.ConsumeUnicode(4): _value(fdp, depth + 1)}
    if k == 4:
        return fdp.ConsumeBool()
    if k == 5:
        return fdp.ConsumeUnicode(20)
    return None


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    obj: dict[str, Any] = {"op": OPS[fdp.ConsumeIntInRange(0, len(OPS) - 1)]}
    for f in ("path", "paths", "module", "generation"):
        if fdp.ConsumeBool():
            obj[f] = _value(fdp)
    if fdp.ConsumeBool():
        obj["paths"] = [_path(fdp) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    # (a quarantine syncs the disk: too slow per input; the hypothesis tests drive it)
    reply: Any
    reply, body = trio.run(SVC.secondary.control, APPLIER, obj)
    encoded = json.dumps(reply).encode()
    assert SECRET not in encoded and SECRET not in body, (obj, reply)
    now = (os.stat(OUTSIDE).st_mtime_ns, os.stat(OUTSIDE / "secret").st_mtime_ns)
    assert now == SENTINEL and (OUTSIDE / "secret").read_bytes() == SECRET


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
