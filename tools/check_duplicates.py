"""Fail on a block of MIN or more lines repeated in the sources (make lint).

Lines are compared stripped of indentation; blank lines, comment lines, import statements
and docstrings do not count (they repeat legitimately and say nothing about copied logic).
Every window of MIN consecutive counted lines is hashed; windows found more than once are
merged into maximal blocks and reported with every place they occur.

A repetition that is justified goes into the allowlist (`--allow FILE`): one block
fingerprint (the 12 hex digits printed) a line with a `# why` comment. A fingerprint that
matches nothing any more is an error too, so the list only shrinks.

Usage: python tools/check_duplicates.py [--min N] [--allow FILE] [DIR ...] (default src).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from allowlist import read_allowlist  # tools/ is the script's own directory

MIN_LINES = 6


@dataclass(frozen=True)
class Line:
    file: str
    lineno: int  # 1-based line in the file
    text: str  # stripped


def _skipped_lines(tree: ast.AST) -> set[int]:
    """Line numbers of import statements and docstrings."""
    stmts: list[ast.stmt] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            stmts.append(node)
        elif isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                stmts.append(first)
    out: set[int] = set()
    for st in stmts:
        out.update(range(st.lineno, (st.end_lineno or st.lineno) + 1))
    return out


def counted_lines(path: Path, name: str) -> list[Line]:
    text = path.read_text(encoding="utf-8")
    skip = _skipped_lines(ast.parse(text, name))
    out = []
    for i, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if s and not s.startswith("#") and i not in skip:
            out.append(Line(name, i, s))
    return out


@dataclass
class Block:
    lines: list[Line]
    others: set[tuple[str, int]]  # where its windows also start (file, line)

    @property
    def fingerprint(self) -> str:
        text = "\n".join(ln.text for ln in self.lines)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def where(self) -> str:
        return f"{self.lines[0].file}:{self.lines[0].lineno}-{self.lines[-1].lineno}"


def duplicate_blocks(files: dict[str, list[Line]], size: int) -> list[Block]:
    def key(lines: list[Line], i: int) -> str:
        return "\n".join(ln.text for ln in lines[i : i + size])

    seen: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, lines in files.items():
        for i in range(len(lines) - size + 1):
            seen[key(lines, i)].append((name, i))

    def block(name: str, lines: list[Line], run: list[int]) -> Block:
        others = {
            (f, j) for i in run for f, j in seen[key(lines, i)] if not (f == name and j in run)
        }
        return Block(lines[run[0] : run[-1] + size], others)

    blocks: list[Block] = []
    for name, lines in files.items():
        run: list[int] = []  # consecutive window starts that occur elsewhere too
        for i in range(len(lines) - size + 1):
            if len(seen[key(lines, i)]) < 2:
                continue
            if run and run[-1] != i - 1:
                blocks.append(block(name, lines, run))
                run = []
            run.append(i)
        if run:
            blocks.append(block(name, lines, run))
    return blocks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min", type=int, default=MIN_LINES)
    ap.add_argument("--allow", type=Path, help="fingerprints of justified blocks, one a line")
    ap.add_argument("dirs", nargs="*", type=Path, default=[Path("src")])
    args = ap.parse_args(argv)
    files: dict[str, list[Line]] = {}
    for d in args.dirs:
        for path in sorted(d.rglob("*.py")):
            files[path.as_posix()] = counted_lines(path, path.as_posix())
    blocks = duplicate_blocks(files, args.min)
    allowed = read_allowlist(args.allow) if args.allow else set()
    bad = 0
    for b in blocks:
        if b.fingerprint in allowed:
            continue
        bad += 1
        also = ", ".join(sorted({f"{f}" for f, _ in b.others}))
        print(f"{b.fingerprint}  {b.where} ({len(b.lines)} lines) also in: {also}")
    for fp in sorted(allowed - {b.fingerprint for b in blocks}):
        print(f"{args.allow}: {fp} matches no repeated block any more: remove the entry")
        bad += 1
    if bad:
        return 1
    print(f"no repeated block of {args.min}+ lines ({len(allowed)} allowlisted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
