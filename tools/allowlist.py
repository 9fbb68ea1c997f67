"""The allowlist files of the structure checks (tools/check_*.py): one entry a line, `#`
starts a comment (the reason), blank lines ignored."""

from __future__ import annotations

from pathlib import Path


def read_allowlist(path: Path) -> set[str]:
    return {
        line
        for raw in path.read_text(encoding="utf-8").splitlines()
        if (line := raw.split("#", 1)[0].strip())
    }
