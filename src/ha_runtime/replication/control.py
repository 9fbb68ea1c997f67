"""The control operations of the replication link: one definition, used by both ends.

A control request is a CONTROL frame (``link.framing``): a JSON object with ``op`` and the
operation's fields, plus a binary body; the secondary answers each with a reply (a JSON
object, ``error`` set if refused, and a body). The primary builds its requests here; the
secondary reads ``op`` with ``Control.of`` and its fields with the parsers below. Whatever
a request holds (missing or wrong-typed fields, invalid paths, an unknown ``op``), the
secondary answers with an error reply, never an exception (``unknown``, ``refused``).
"""

from __future__ import annotations

import enum
import os
import re
from typing import Any

from ha_runtime.replication.journal import valid_path


class Control(enum.StrEnum):
    # Primary -> secondary first: module, node; ``untagged`` offers frames without a tag.
    # Reply: the secondary's generation, ``synced``, ``dirty`` and its ``activity`` plan.
    HELLO = "hello"
    # The secondary is in sync at ``generation`` (hex): it drops its logs. Reply: _durable.
    IN_SYNC = "in_sync"
    # The secondary's tree ({path: [type, size, mtime...]}), of ``paths``' subtrees if given.
    LIST = "list"
    # Content digests of the secondary's files, of ``paths`` only if given (verify).
    DIGEST = "digest"
    # The delta signature of one regular file ``path``, in the reply's body.
    SIG = "sig"
    # Copy ``paths`` aside before the primary overwrites them (split brain). Reply: the
    # directory and the number of files copied; ``error`` if any could not be saved.
    QUARANTINE = "quarantine"

    @classmethod
    def of(cls, obj: dict[str, Any]) -> Control | None:
        """The operation a request names; None: unknown (refused with ``unknown``)."""
        op = obj.get("op")
        try:
            return cls(op) if isinstance(op, str) else None
        except ValueError:
            return None


# -- requests (primary)


def hello(module: str, node: str) -> dict[str, Any]:
    return {"op": Control.HELLO.value, "module": module, "node": node, "untagged": True}


def in_sync(generation: str) -> dict[str, Any]:
    return {"op": Control.IN_SYNC.value, "generation": generation}


def list_tree(paths: list[str] | None = None) -> dict[str, Any]:
    ask: dict[str, Any] = {"op": Control.LIST.value}
    if paths is not None:
        ask["paths"] = paths
    return ask


def digest(paths: list[str] | None = None) -> dict[str, Any]:
    ask: dict[str, Any] = {"op": Control.DIGEST.value}
    if paths is not None:
        ask["paths"] = paths
    return ask


def signature(path: str) -> dict[str, Any]:
    return {"op": Control.SIG.value, "path": path}


def quarantine(paths: list[str]) -> dict[str, Any]:
    return {"op": Control.QUARANTINE.value, "paths": paths}


# -- replies and fields (secondary)

# A generation as the primary declares it: hex digits (the manager's 16).
GENERATION = re.compile(r"[0-9a-f]{1,64}")
_BRIEF = 120  # characters of a peer's value quoted in an error


def brief(v: Any) -> str:
    """A peer's value quoted in a log line or error reply, bounded."""
    try:
        r = repr(v) if not isinstance(v, BaseException) else str(v)
    except RecursionError:  # a list nested 10 000 deep
        r = f"<deeply nested {type(v).__name__}>"
    return r if len(r) <= _BRIEF else r[:_BRIEF] + "..."


def unknown(obj: dict[str, Any]) -> dict[str, Any]:
    return {"error": f"unknown control {brief(obj.get('op'))}"}


def refused(obj: dict[str, Any], e: Exception) -> dict[str, Any]:
    op = brief(obj.get("op"))
    return {"error": f"control {op}: {type(e).__name__}: {brief(e)}"}


def rel_paths(raw: Any) -> list[bytes]:
    """The valid relative paths of a request's list (JSON strings, non-UTF-8 bytes carried
    as surrogate escapes); anything else in it is left out."""
    if not isinstance(raw, list):
        return []
    out: list[bytes] = []
    for p in raw:
        if not isinstance(p, str):
            continue
        try:
            rel = os.fsencode(p)
        except UnicodeEncodeError:
            continue  # a lone surrogate that no file name decodes to
        if valid_path(rel):
            out.append(rel)
    return out
