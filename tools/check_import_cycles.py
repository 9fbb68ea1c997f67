"""Fail when the modules of the given packages import each other in a cycle (make lint).

Every import counts, wherever it is written (module top, function body, TYPE_CHECKING
block): an import moved into a function or under TYPE_CHECKING still ties the two modules
together, it only hides the cycle from the interpreter. Importing `a.b.c` also runs the
package `a.b` (its __init__.py), so that is an edge too, except towards the importer's own
packages (a package importing its submodules, which import their siblings, is no cycle).

Usage: python tools/check_import_cycles.py [--src DIR] [--allow FILE] [PACKAGE ...]
(default: --src src ha_runtime ha_lab). Prints every cycle with the import lines that
make it and exits 1; exits 0 when the graph is acyclic. `--allow FILE` lists edges
(`importer -> imported  # why`) left out of the graph until they are fixed; an entry that
no longer matches an import is an error too, so the list only shrinks.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

Edge = tuple[str, int]  # (file, line) of the import that makes the edge


def module_files(src: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Module name -> file, for every .py file of the packages (packages by __init__.py)."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((src / pkg).rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool) -> list[str]:
    """Absolute names an import statement may load (modules or packages)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against the importer's package
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join([*pkg, base] if base else pkg)
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph(modules: dict[str, Path], root: Path) -> dict[str, dict[str, Edge]]:
    graph: dict[str, dict[str, Edge]] = {m: {} for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_pkg = path.name == "__init__.py"
        own = set(_ancestors(module)) | ({module} if is_pkg else set())
        where = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in _imported(node, module, is_pkg):
                for target in [*_ancestors(name), name]:
                    if target in modules and target != module and target not in own:
                        graph[module].setdefault(target, (where, node.lineno))
    return graph


def cycles(graph: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp: list[str] = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def read_allowlist(path: Path) -> set[tuple[str, str]]:
    edges: set[tuple[str, str]] = set()
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            a, sep, b = line.partition("->")
            if not sep or not a.strip() or not b.strip():
                raise SystemExit(f"{path}: expected 'importer -> imported  # why', got {raw!r}")
            edges.add((a.strip(), b.strip()))
    return edges


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("src"))
    ap.add_argument("--allow", type=Path, help="edges to leave out, one 'a -> b  # why' a line")
    ap.add_argument("packages", nargs="*", default=["ha_runtime", "ha_lab"])
    args = ap.parse_args(argv)
    modules = module_files(args.src, args.packages)
    graph = import_graph(modules, Path.cwd())
    stale = 0
    for a, b in sorted(read_allowlist(args.allow) if args.allow else set()):
        if b not in graph.get(a, {}):
            print(f"{args.allow}: {a} -> {b} no longer imported: remove the entry")
            stale += 1
        else:
            del graph[a][b]
    found = cycles(graph)
    for comp in found:
        members = set(comp)
        print(f"import cycle among {len(comp)} modules: {', '.join(comp)}")
        for m in comp:
            for target, (file, line) in sorted(graph[m].items()):
                if target in members:
                    print(f"  {file}:{line}: {m} -> {target}")
    if found:
        print(
            f"{len(found)} import cycle(s); move what both sides need to one of them, or below both"
        )
    if found or stale:
        return 1
    print(f"no import cycle among {len(modules)} modules of {', '.join(args.packages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
