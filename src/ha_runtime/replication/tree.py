"""What a copy holds, listed or digested the same way on both sides: the resync compares
listings (``Control.LIST``), verify compares digests (``Control.DIGEST``). Never follows a
symlink; paths are resolved beneath the root (``beneath``).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ha_runtime.replication import beneath


def list_tree(root: Path, scope: Iterable[bytes] | None = None) -> dict[str, list[int]]:
    """path -> [mode, size, mtime_ns] of everything under root (not root itself); with
    ``scope``, of those paths and everything under them only (a path that is not valid, or
    whose parent is not a directory inside root, a symlink on the way included, is left
    out). Never follows a symlink; paths longer than a record can name are left out."""
    out: dict[str, list[int]] = {}
    rfd = os.open(root, beneath.DIR_FLAGS)
    try:
        tops = [b""] if scope is None else []
        for rel in scope or ():
            st = _lstat_beneath(rfd, rel)
            if st is None:
                continue
            out[os.fsdecode(rel)] = [st.st_mode, st.st_size, st.st_mtime_ns]
            if stat.S_ISDIR(st.st_mode):
                tops.append(rel)
        for top in tops:
            for rel, st, _, _ in beneath.walk(rfd, top):
                out[os.fsdecode(rel)] = [st.st_mode, st.st_size, st.st_mtime_ns]
    finally:
        os.close(rfd)
    return out


def _lstat_beneath(rfd: int, rel: bytes) -> os.stat_result | None:
    """lstat of ``rel`` beneath the root; None when invalid, missing or not reachable
    without following a symlink."""
    try:
        pfd, name = beneath.open_parent(rfd, rel)
    except (OSError, ValueError):
        return None
    try:
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        if pfd != rfd:
            os.close(pfd)


def tree_digests(root: Path) -> dict[str, str]:
    """Digest of everything under root (`_digest_at`), never following a symlink."""
    out: dict[str, str] = {}
    rfd = os.open(root, beneath.DIR_FLAGS)
    try:
        for rel, st, dfd, name in beneath.walk(rfd):
            digest = _digest_at(dfd, name, st)
            if digest is not None:
                out[os.fsdecode(rel)] = digest
    finally:
        os.close(rfd)
    return out


def digests_of(root: Path, paths: list[str]) -> dict[str, str]:
    """The digests of `tree_digests` for some relative paths only (missing, unreachable
    and invalid ones left out)."""
    out: dict[str, str] = {}
    rfd = os.open(root, beneath.DIR_FLAGS)
    try:
        for p in paths:
            try:
                rel = os.fsencode(p)
                pfd, name = beneath.open_parent(rfd, rel)
            except (OSError, ValueError):
                continue  # not encodable, not valid, or not beneath root without a symlink
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                digest = _digest_at(pfd, name, st)
            except OSError:
                continue
            finally:
                if pfd != rfd:
                    os.close(pfd)
            if digest is not None:
                out[p] = digest
    finally:
        os.close(rfd)
    return out


def _digest_at(dfd: int, name: bytes, st: os.stat_result) -> str | None:
    """``f:<sha256>`` of a regular file, ``l:<target>`` of a symlink, ``m:<type>`` else;
    None when it vanished meanwhile, ``e:<errno>`` when it could not be read."""
    try:
        if stat.S_ISREG(st.st_mode):
            fd = beneath.open_file(name, dfd)
            try:
                h = hashlib.sha256()
                while chunk := os.read(fd, 1 << 20):
                    h.update(chunk)
            finally:
                os.close(fd)
            return "f:" + h.hexdigest()
        if stat.S_ISLNK(st.st_mode):
            return "l:" + os.fsdecode(os.readlink(name, dir_fd=dfd))
        return f"m:{stat.S_IFMT(st.st_mode):o}"
    except FileNotFoundError:
        return None
    except OSError as e:
        # Replaced by another type meanwhile (ELOOP, EINVAL): a difference verify reports
        # and checks again, never a read of something else.
        return f"e:{e.errno}"


def compare(ours: dict[str, str], theirs: dict[str, str]) -> list[str]:
    diffs = []
    for p in sorted(set(ours) | set(theirs)):
        a, b = ours.get(p), theirs.get(p)
        if a != b:
            diffs.append(f"{p}: primary {a or 'missing'}, secondary {b or 'missing'}")
    return diffs
