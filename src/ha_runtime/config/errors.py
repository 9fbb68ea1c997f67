"""The one error collector of every config parser, and the exception the loaders raise.

A mistake in a rendered file is found on a running site by a human reading our message:
every error names the file, the field path and what was expected, and all errors are
reported at once (a broken inventory is fixed in one round trip). Every parser of the
package (node file, module file, its `farm:` section) records through `Collector`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """Raised with every problem found in one or more files."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Collector:
    """Collects errors for one file; every accessor records a problem and returns None."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.errors: list[str] = []

    def err(self, where: str, msg: str) -> None:
        self.errors.append(f"{self.path}: {where}: {msg}" if where else f"{self.path}: {msg}")

    def mapping(self, value: Any, where: str, allowed: frozenset[str]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.err(where or "(top level)", f"expected a mapping, got {show(value)}")
            return None
        self.unknown_keys(value, where, allowed)
        return value

    def unknown_keys(self, value: dict[Any, Any], where: str, allowed: frozenset[str]) -> None:
        for key in value:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.err(join(where, str(key)), f"unknown field (allowed here: {hint})")

    def required(self, d: dict[str, Any], key: str, where: str) -> Any:
        if key not in d or d[key] is None:
            self.err(join(where, key), "required field is missing")
            return None
        return d[key]

    def string(
        self, value: Any, where: str, pattern: re.Pattern[str] | None = None, what: str = ""
    ) -> str | None:
        if not isinstance(value, str) or not value:
            self.err(where, f"expected a non-empty string, got {show(value)}")
            return None
        if pattern is not None and not pattern.match(value):
            self.err(
                where, f"expected {what or 'a string matching ' + pattern.pattern}, got {value!r}"
            )
            return None
        return value

    def integer(self, value: Any, where: str, lo: int, hi: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(where, f"expected an integer between {lo} and {hi}, got {show(value)}")
            return None
        if not lo <= value <= hi:
            self.err(where, f"expected an integer between {lo} and {hi}, got {value}")
            return None
        return value

    def number(self, value: Any, where: str, lo: float, hi: float) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.err(where, f"expected a number between {lo:g} and {hi:g}, got {show(value)}")
            return None
        if not lo <= value <= hi:
            self.err(where, f"expected a number between {lo:g} and {hi:g}, got {value}")
            return None
        return float(value)

    def abspath(self, value: Any, where: str) -> Path | None:
        text = self.string(value, where)
        if text is None:
            return None
        if not text.startswith("/"):
            self.err(where, f"expected an absolute path, got {text!r}")
            return None
        return Path(text)

    def ipv4(self, value: Any, where: str) -> str | None:
        try:
            return str(ipaddress.IPv4Address(value if isinstance(value, str) else ""))
        except ValueError:
            self.err(where, f"expected an IPv4 address like 10.77.0.11, got {show(value)}")
            return None

    def choice(self, value: Any, where: str, choices: tuple[str, ...]) -> str | None:
        if value not in choices:
            self.err(where, f"expected one of {', '.join(choices)}, got {show(value)}")
            return None
        return str(value)

    def str_list(self, value: Any, where: str, item: Callable[[Any, str], Any]) -> list[Any]:
        if not isinstance(value, list):
            self.err(where, f"expected a list, got {show(value)}")
            return []
        out = [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [v for v in out if v is not None]


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def show(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
