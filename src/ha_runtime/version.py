"""The version of the installed hapair runtime, as its wheel's metadata says."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "hapair"


def runtime_version() -> str:
    """Version of the hapair distribution this code runs from; "unknown" in a bare tree."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        # Running from a source tree that was never installed: no metadata to report.
        return "unknown"
