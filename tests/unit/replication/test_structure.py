"""The replication package's structure holds (docs/replication.md, *Layout of the code*):
no import cycle between its modules, the primary's and the secondary's code never import
each other, the link knows neither, no module of the runtime reads another module's private
attribute
(a module over 400 lines says why: tools/check_file_length.py in `make lint`)."""

from __future__ import annotations

import ast
from pathlib import Path

import ha_runtime.replication

ROOT = Path(ha_runtime.replication.__file__).parent
PKG = "ha_runtime.replication"


def _modules(root: Path = ROOT, pkg: str = PKG) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).with_suffix("")
        parts = [pkg, *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports at import time (not under
    TYPE_CHECKING, not inside functions: those cannot make a cycle at import)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for n in ast.walk(node) if isinstance(node, ast.If | ast.Try) else [node]:
            if isinstance(n, ast.Import):
                found |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module:
                found.add(n.module)
                found |= {f"{n.module}.{a.name}" for a in n.names}
    out = set()
    for imported in found:
        # `from pkg import mod` names a module; `from mod import name` the module itself
        m = imported
        while m and m not in known:
            m = m.rpartition(".")[0]
        if m and m != name:
            out.add(m)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_cycle_inside_replication() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            # A package's __init__ is imported before its modules: an edge from a module to
            # its own package is not a cycle through the package's body.
            if m.startswith(d + "."):
                continue
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d) :], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_roles_and_link_do_not_import_each_other() -> None:
    graph = _graph()
    forbidden = {
        f"{PKG}.primary": (f"{PKG}.secondary",),
        f"{PKG}.secondary": (f"{PKG}.primary",),
        f"{PKG}.link": (f"{PKG}.primary", f"{PKG}.secondary", f"{PKG}.resync"),
        f"{PKG}.resync": (f"{PKG}.primary", f"{PKG}.secondary"),
    }
    bad = [
        (m, d)
        for m, deps in graph.items()
        for area, banned in forbidden.items()
        if m == area or m.startswith(area + ".")
        for d in deps
        if any(d == b or d.startswith(b + ".") for b in banned)
    ]
    assert not bad, bad


def _private_defined(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            names.add(n.attr)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            names.add(n.target.id)
    return {x for x in names if x.startswith("_")}


# Documented public functions of the standard library that only look private.
STDLIB_UNDERSCORED = frozenset({"os._exit"})


def test_no_private_attribute_read_across_modules() -> None:
    """Across the whole runtime, not only replication (issue 15)."""
    bad = []
    for name, path in _modules(ROOT.parent, "ha_runtime").items():
        tree = ast.parse(path.read_text())
        own = _private_defined(tree)
        for n in ast.walk(tree):
            if not isinstance(n, ast.Attribute) or not n.attr.startswith("_"):
                continue
            if n.attr.startswith("__") or n.attr in own or ast.unparse(n) in STDLIB_UNDERSCORED:
                continue
            if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                # inherited from a base in another module (a subclass's own business)
                continue
            bad.append(f"{name}:{n.lineno}: {ast.unparse(n)}")
    assert not bad, bad
