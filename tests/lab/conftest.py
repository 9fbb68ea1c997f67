"""Lab tests run against real systemd-nspawn nodes; they need root and run in `make test`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ha_lab.lab import Lab


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/lab needs the lab: mark it so `-m lab` selects it.
    for item in items:
        item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (they build namespaces and containers); run as root")
    instance = Lab()
    instance.up(2)
    yield instance
