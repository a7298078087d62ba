"""Checkpoints: Orbax payloads indexed by JSON manifests (the only package importing Orbax).

See docs/checkpoints.md. Train loop: `CheckpointManager(config)`. Notebooks and
scripts: `list_checkpoints`, `restore`, `restore_latest`, `load_model`.
"""

from hope_jax.checkpoint.api import Restored, list_checkpoints, load_model, restore, restore_latest
from hope_jax.checkpoint.manager import CheckpointManager
from hope_jax.checkpoint.manifest import (
  CheckpointError,
  CheckpointInfo,
  ConfigMismatchError,
  config_diff,
)

__all__ = [
    "CheckpointError", "CheckpointInfo", "CheckpointManager", "ConfigMismatchError", "Restored",
    "config_diff", "list_checkpoints", "load_model", "restore", "restore_latest",
]
