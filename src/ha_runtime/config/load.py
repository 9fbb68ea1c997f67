"""Read the files from disk: one file, the whole site, or `hactl config check`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ha_runtime.config.cluster_file import parse_cluster
from ha_runtime.config.errors import Collector, ConfigError
from ha_runtime.config.model import DEFAULT_CLUSTER_FILE, ClusterConfig, ModuleConfig, SiteConfig
from ha_runtime.config.module_file import parse_module


def read_yaml(path: Path, v: Collector) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        v.err("", f"cannot read file: {exc.strerror}")
        return None
    except UnicodeDecodeError as exc:  # a binary or corrupt file is a config error, not a crash
        v.err("", f"invalid YAML: not UTF-8 (byte {exc.start})")
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        v.err(where, f"invalid YAML: {problem}")
        return None
    except RecursionError:  # PyYAML composes nested nodes recursively: "[[[[..." overflows
        v.err("", "invalid YAML: nested too deeply")
        return None


def load_cluster(path: Path = DEFAULT_CLUSTER_FILE) -> ClusterConfig:
    v = Collector(path)
    data = read_yaml(path, v)
    if v.errors:
        raise ConfigError(v.errors)
    cfg, errors = parse_cluster(data, path)
    if errors or cfg is None:
        raise ConfigError(errors)
    return cfg


def load_module(
    path: Path, cluster: ClusterConfig | None = None, check_files: bool = True
) -> ModuleConfig:
    v = Collector(path)
    data = read_yaml(path, v)
    if v.errors:
        raise ConfigError(v.errors)
    cfg, errors = parse_module(data, path, cluster, check_files)
    if errors or cfg is None:
        raise ConfigError(errors)
    return cfg


def module_files(modules_dir: Path) -> Iterator[Path]:
    if modules_dir.is_dir():
        yield from sorted(p for p in modules_dir.iterdir() if p.suffix in (".yml", ".yaml"))


def load_site(cluster_path: Path = DEFAULT_CLUSTER_FILE) -> SiteConfig:
    """Load the node file and every module file; all errors of all files are raised together."""
    cluster = load_cluster(cluster_path)
    errors: list[str] = []
    modules: list[ModuleConfig] = []
    vips: dict[str, Path] = {}
    for path in module_files(cluster.modules_dir):
        try:
            m = load_module(path, cluster)
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        if m.vip is not None:  # mirror and farm: one module per virtual IP
            if m.vip.address in vips:
                errors.append(
                    f"{path}: vip.address: {m.vip.address} is already used by {vips[m.vip.address]}"
                )
            vips[m.vip.address] = path
        modules.append(m)
    if errors:
        raise ConfigError(errors)
    return SiteConfig(cluster=cluster, modules=modules)


def check_file(path: Path, cluster_path: Path | None = None, check_files: bool = True) -> list[str]:
    """What `hactl config check FILE` prints: every error, or an empty list.

    The kind of file is told by its content: a node file has a top-level `node` field.
    """
    v = Collector(path)
    data = read_yaml(path, v)
    if v.errors:
        return v.errors
    if isinstance(data, dict) and "node" in data:
        return parse_cluster(data, path)[1]
    cluster = None
    if cluster_path is not None and cluster_path.exists():
        try:
            cluster = load_cluster(cluster_path)
        except ConfigError as exc:
            return exc.errors
    return parse_module(data, path, cluster, check_files)[1]
