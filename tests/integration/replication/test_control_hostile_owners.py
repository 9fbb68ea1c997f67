"""Every control handler on hostile trees whose files have odd owners (root only: chown).

The trees, requests and the Setup are those of tests/unit/replication/test_control_hostile.py;
this test needs root, so it lives in the integration tier, where it is never skipped.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.replication.test_control_hostile import (
    IDS,
    NAMES,
    REQUEST,
    TREE,
    Setup,
    _build,
    _retype,
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=TREE, uid=IDS, requests=st.lists(REQUEST, min_size=1, max_size=4),
       extra=st.lists(NAMES, max_size=3))  # fmt: skip
def test_every_handler_on_hostile_trees(
    tmp_path_factory: pytest.TempPathFactory, tree: list[tuple[list[bytes], str]], uid: int,
    requests: list[str], extra: list[bytes],
) -> None:  # fmt: skip
    s = Setup(tmp_path_factory.mktemp("h"))
    try:
        made = _build(s, tree, uid)
        # Paths through every link: "link/secret", "link/target/secret" and friends.
        paths = [os.fsdecode(p) for p in made]
        paths += [os.fsdecode(p + b"/" + t) for p in made for t in (b"secret", b"target/secret")]
        paths += [os.fsdecode(b"/".join(extra))] if extra else []
        for r in requests:
            if r == "sig":
                for p in paths[:8]:
                    s.control({"op": "sig", "path": p})
            elif r == "digest":
                s.control({"op": "digest"})
            elif r == "digest_paths":
                s.control({"op": "digest", "paths": paths})
            elif r == "list":
                reply, _ = s.control({"op": "list"})
                if "retype" not in requests:
                    assert set(reply["tree"]) >= {os.fsdecode(p) for p in made}
            elif r == "list_paths":
                s.control({"op": "list", "paths": paths})
            elif r == "quarantine":
                s.control({"op": "quarantine", "paths": paths})
            elif r == "in_sync":
                s.control({"op": "in_sync", "generation": "00000000000000ab"})
            elif r == "retype":
                _retype(s, made)
            else:
                reply, _ = s.control({"op": "hello", "module": "demo"})
                assert reply["module"] == "demo"
        s.check_outside()
    finally:
        s.close()
