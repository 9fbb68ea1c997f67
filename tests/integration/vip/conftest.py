"""A throwaway network namespace for the VIP tests (root; this tier runs as root)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture
def netns() -> Iterator[list[str]]:
    """A new namespace with a veth pair hatest0/hatest1 up (this kernel has no dummy
    module); yields the `ip netns exec <ns>` prefix, and deletes the namespace after."""
    ns = f"hatest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run = ["ip", "netns", "exec", ns]
        link = ["ip", "link", "add", "hatest0", "type", "veth", "peer", "name", "hatest1"]
        subprocess.run([*run, *link], check=True)
        for dev in ("hatest0", "hatest1"):
            subprocess.run([*run, "ip", "link", "set", dev, "up"], check=True)
        yield run
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
