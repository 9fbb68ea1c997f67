"""Every on-disk path of one replicated directory, derived once (docs/replication.md).

Both roles and the process entry use these paths; nothing else joins them by hand:

- ``backing``: the copy itself (``<base>/<module>/<index>``); the primary's FUSE mount
  serves it at ``app_dir``, the secondary's applier writes into it.
- ``staging``: where the secondary's applier names a rebuilt file before it replaces the
  old one (``<base>/<module>/.<index>.hapair-staging``, beside the backing directory on the
  same file system; ``secondary.staging``, ``staging_of``).
- ``dirty``: the dirty log (``<base>/<module>.<index>.dirty``): what the peer may lack.
- ``activity``: the activity log (``<base>/<module>.<index>.al``): what may be in flight.
- ``synced``: the generation at which both copies were last identical.
- ``quarantine_root``: the secondary's saved copies of split-brain files (per module).
- ``stray_root``: files written in ``app_dir`` while it was not replicated (per module).
The module's data generation file is the generation store's (``GenerationStore(state_dir,
module)``, shared with the mirror manager): not a replication path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ha_runtime.config import ModuleConfig, ReplicationSettings


@dataclass(frozen=True)
class Layout:
    module: str
    index: int
    app_dir: Path
    base: Path  # the replication root: ReplicationSettings.backing_root or <state_dir>/replica
    state_dir: Path

    @classmethod
    def of(
        cls, module: ModuleConfig, index: int, state_dir: Path, settings: ReplicationSettings
    ) -> Layout:
        """Directory `index` of `module`, its root from the settings (the one rule for it)."""
        base = settings.backing_base(state_dir)
        return cls(module.name, index, module.replicated_dirs[index], base, state_dir)

    @cached_property
    def backing(self) -> Path:
        return self.base / self.module / str(self.index)

    @cached_property
    def backing_bytes(self) -> bytes:
        """``backing`` as the bytes the primary joins paths to on every barrier (built once:
        a Path joined and encoded per fsync was a tenth of the barrier's own cost)."""
        return os.fsencode(self.backing)

    @property
    def staging(self) -> Path:
        return staging_of(self.backing)

    @property
    def dirty(self) -> Path:
        return self.base / f"{self.module}.{self.index}.dirty"

    @property
    def activity(self) -> Path:
        return self.base / f"{self.module}.{self.index}.al"

    @property
    def synced(self) -> Path:
        return self.base / f"{self.module}.{self.index}.synced"

    @property
    def quarantine_root(self) -> Path:
        return self.base / f"{self.module}.quarantine"

    @property
    def stray_root(self) -> Path:
        return self.base / f"{self.module}.stray"


def staging_of(backing: Path) -> Path:
    """The staging directory of a backing directory (the applier knows only its root)."""
    return backing.parent / f".{backing.name}.hapair-staging"
