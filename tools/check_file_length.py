"""Fail when a runtime source file is over the line limit without a stated reason (make lint).

A file of src/ may exceed LIMIT lines only if its module docstring has a line starting with
`Long because:` followed by the reason, so a reader learns at the top why it is not split.
Files still to split are listed in an allowlist (`--allow FILE`: one path a line with a
`# why` comment) that only shrinks: an entry whose file is now within the limit, or gone,
is an error too.

Usage: python tools/check_file_length.py [--limit N] [--allow FILE] [DIR ...] (default src).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

from allowlist import read_allowlist  # tools/ is the script's own directory

LIMIT = 400
MARKER = re.compile(r"^\s*Long because:\s*\S", re.MULTILINE)


def states_reason(text: str) -> bool:
    try:
        doc = ast.get_docstring(ast.parse(text), clean=True)
    except SyntaxError:
        return False
    return doc is not None and MARKER.search(doc) is not None


def offenders(dirs: list[Path], limit: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dirs:
        for path in sorted(d.rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            n = len(text.splitlines())
            if n > limit and not states_reason(text):
                out[path.as_posix()] = n
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=LIMIT)
    ap.add_argument("--allow", type=Path, help="paths still to split, one a line")
    ap.add_argument("dirs", nargs="*", type=Path, default=[Path("src")])
    args = ap.parse_args(argv)
    found = offenders(args.dirs, args.limit)
    allowed = read_allowlist(args.allow) if args.allow else set()
    bad = 0
    for path, n in sorted(found.items()):
        if path not in allowed:
            print(
                f"{path}: {n} lines, over {args.limit} with no 'Long because: ...' in its docstring"
            )
            bad += 1
    for path in sorted(allowed - set(found)):
        print(f"{args.allow}: {path} is no longer a long file without a reason: remove the entry")
        bad += 1
    if bad:
        return 1
    print(f"no file over {args.limit} lines without a reason ({len(allowed)} allowlisted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
