"""Fixtures of the farm namespace tests (helpers live in farmnet.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from farmnet import FarmNet


@pytest.fixture
def farm_net(request: pytest.FixtureRequest) -> Iterator[FarmNet]:
    if os.geteuid() != 0:
        pytest.fail("farm namespace tests need root (they build network namespaces)")
    tag = "".join(c for c in request.node.name if c.isalnum())[-8:]
    net = FarmNet(tag)
    try:
        yield net
    finally:
        net.teardown()
