"""The structure checks of `make lint` (tools/check_*.py) fail on what they are for.

Each runs as `make lint` runs it, on a synthetic source tree written here, so a check that
stopped finding anything would fail these tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# --------------------------------------------------------------------------- import cycles


def test_acyclic_package_passes(tmp_path: Path) -> None:
    write(
        tmp_path / "src",
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "import os\n",
        },
    )
    r = run("check_import_cycles.py", "pkg", cwd=tmp_path)
    assert r.returncode == 0, r.stdout
    assert "no import cycle among 3 modules" in r.stdout


def test_a_cycle_fails_with_the_import_lines(tmp_path: Path) -> None:
    write(
        tmp_path / "src",
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import X\n",
            # A lazy import in a function body is still a cycle.
            "pkg/b.py": "X = 1\n\n\ndef f() -> None:\n    from pkg import a\n",
        },
    )
    r = run("check_import_cycles.py", "pkg", cwd=tmp_path)
    assert r.returncode == 1
    assert "import cycle among 2 modules: pkg.a, pkg.b" in r.stdout
    assert "src/pkg/a.py:1: pkg.a -> pkg.b" in r.stdout
    assert "src/pkg/b.py:5: pkg.b -> pkg.a" in r.stdout


def test_type_checking_and_relative_imports_count(tmp_path: Path) -> None:
    write(
        tmp_path / "src",
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from . import b\n",
            "pkg/b.py": "import typing\nif typing.TYPE_CHECKING:\n    from .a import T\n",
        },
    )
    assert run("check_import_cycles.py", "pkg", cwd=tmp_path).returncode == 1


def test_a_package_init_closes_a_cycle(tmp_path: Path) -> None:
    # config imports farm.buckets, which runs farm/__init__.py, which imports farm.service,
    # which imports config: the shape this project had between config.py and farm/.
    write(
        tmp_path / "src",
        {
            "pkg/__init__.py": "",
            "pkg/config.py": "from pkg.farm.buckets import N\n",
            "pkg/farm/__init__.py": "from pkg.farm.service import S\n",
            "pkg/farm/buckets.py": "N = 8\n",
            "pkg/farm/service.py": "from pkg.farm import buckets\nfrom pkg.config import C\n",
        },
    )
    r = run("check_import_cycles.py", "pkg", cwd=tmp_path)
    assert r.returncode == 1
    assert "pkg.config, pkg.farm, pkg.farm.service" in r.stdout
    # A package importing its own submodules, which import their siblings, is no cycle.
    (tmp_path / "src/pkg/farm/service.py").write_text("from pkg.farm import buckets\n")
    assert run("check_import_cycles.py", "pkg", cwd=tmp_path).returncode == 0


def test_allowlisted_edge_breaks_the_cycle_and_stale_entries_fail(tmp_path: Path) -> None:
    write(
        tmp_path / "src",
        {"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "import pkg.a\n"},
    )
    allow = tmp_path / "allow.txt"
    allow.write_text("# why\npkg.b -> pkg.a  # to break later\n")
    assert run("check_import_cycles.py", "--allow", str(allow), "pkg", cwd=tmp_path).returncode == 0
    (tmp_path / "src/pkg/b.py").write_text("")
    r = run("check_import_cycles.py", "--allow", str(allow), "pkg", cwd=tmp_path)
    assert r.returncode == 1
    assert "pkg.b -> pkg.a no longer imported: remove the entry" in r.stdout


# --------------------------------------------------------------------------- file length


def test_long_file_needs_a_stated_reason(tmp_path: Path) -> None:
    body = "x = 1\n" * 20
    write(
        tmp_path / "src",
        {
            "short.py": '"""Short."""\n' + body[:12],
            "long.py": '"""Long."""\n' + body,
            "reasoned.py": '"""Reasoned.\n\nLong because: one table.\n"""\n' + body,
        },
    )
    r = run("check_file_length.py", "--limit", "10", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        "src/long.py: 21 lines, over 10 with no 'Long because: ...' in its docstring"
    ]
    allow = tmp_path / "allow.txt"
    allow.write_text("src/long.py  # to split\n")
    r = run("check_file_length.py", "--limit", "10", "--allow", str(allow), cwd=tmp_path)
    assert r.returncode == 0, r.stdout
    (tmp_path / "src/long.py").write_text("x = 1\n")
    r = run("check_file_length.py", "--limit", "10", "--allow", str(allow), cwd=tmp_path)
    assert r.returncode == 1
    assert "src/long.py is no longer a long file without a reason" in r.stdout


# --------------------------------------------------------------------------- duplicates

BLOCK = """
def {name}(v, d):
    total = 0
    for k in d:
        if k.startswith("x"):
            total += d[k] * 2
        else:
            total -= 1
    return total + v
"""


def test_repeated_block_is_found_in_both_places(tmp_path: Path) -> None:
    write(
        tmp_path / "src",
        {
            "a.py": '"""A."""\nimport os\n' + BLOCK.format(name="one"),
            "b.py": '"""B."""\nimport os\n\n# comment\n' + BLOCK.format(name="two"),
        },
    )
    r = run("check_duplicates.py", "--min", "6", cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert "src/a.py:5-11 (7 lines) also in: src/b.py" in lines[0]
    assert "src/b.py:7-13 (7 lines) also in: src/a.py" in lines[1]
    fingerprint = lines[0].split()[0]
    assert lines[1].split()[0] == fingerprint
    # Justified in the allowlist: passes; once the repetition is gone the entry is stale.
    allow = tmp_path / "allow.txt"
    allow.write_text(f"{fingerprint}  # same formula on purpose\n")
    assert run("check_duplicates.py", "--allow", str(allow), cwd=tmp_path).returncode == 0
    (tmp_path / "src/b.py").write_text('"""B."""\n')
    r = run("check_duplicates.py", "--allow", str(allow), cwd=tmp_path)
    assert r.returncode == 1
    assert f"{fingerprint} matches no repeated block any more" in r.stdout


def test_five_lines_docstrings_and_imports_are_not_duplicates(tmp_path: Path) -> None:
    doc = '"""' + "\n".join(f"line {i}" for i in range(10)) + '\n"""\n'
    imports = "from os import (\n    path,\n    sep,\n    getcwd,\n    environ,\n    walk,\n)\n"
    five = "a = 1\nb = 2\nc = 3\nd = 4\ne = 5\n"
    write(tmp_path / "src", {"a.py": doc + imports + five, "b.py": doc + imports + five})
    r = run("check_duplicates.py", cwd=tmp_path)
    assert r.returncode == 0, r.stdout
