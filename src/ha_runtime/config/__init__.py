"""The node file (cluster.yml) and the module files (modules/<name>.yml): typed values,
their parsers and loaders (docs/configuration.md has the schema and the data path).

- model.py: the typed values the runtime reads (`ClusterConfig`, `ModuleConfig`, ...);
- errors.py: `ConfigError` and the one error `Collector` every parser records through;
- names.py: the name rules, shared with the Ansible collection;
- cluster_file.py, module_file.py, checker_section.py, farm.py: the parsers;
- load.py: reading files from disk, a whole site, `hactl config check`.
"""

from ha_runtime.config.cluster_file import parse_cluster
from ha_runtime.config.errors import ConfigError
from ha_runtime.config.farm import FarmRule, FarmSettings, parse_farm_section
from ha_runtime.config.load import (
    check_file,
    load_cluster,
    load_module,
    load_site,
    module_files,
)
from ha_runtime.config.model import (
    DEFAULT_API_SOCKET,
    DEFAULT_CLUSTER_FILE,
    DEFAULT_HEARTBEAT_PORT,
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_MODULES_DIR,
    DEFAULT_STATE_DIR,
    CheckerSpec,
    ClusterConfig,
    ConsoleSpec,
    ConsoleUserSpec,
    HeartbeatSpec,
    ModuleConfig,
    NodeSpec,
    ReplicationSettings,
    RestartPolicy,
    ScriptsSpec,
    SiteConfig,
    TlsSpec,
    VipSpec,
)
from ha_runtime.config.module_file import parse_module

__all__ = [
    "DEFAULT_API_SOCKET",
    "DEFAULT_CLUSTER_FILE",
    "DEFAULT_HEARTBEAT_PORT",
    "DEFAULT_METRICS_ADDRESS",
    "DEFAULT_MODULES_DIR",
    "DEFAULT_STATE_DIR",
    "CheckerSpec",
    "ClusterConfig",
    "ConfigError",
    "ConsoleSpec",
    "ConsoleUserSpec",
    "FarmRule",
    "FarmSettings",
    "HeartbeatSpec",
    "ModuleConfig",
    "NodeSpec",
    "ReplicationSettings",
    "RestartPolicy",
    "ScriptsSpec",
    "SiteConfig",
    "TlsSpec",
    "VipSpec",
    "check_file",
    "load_cluster",
    "load_module",
    "load_site",
    "module_files",
    "parse_cluster",
    "parse_farm_section",
    "parse_module",
]
