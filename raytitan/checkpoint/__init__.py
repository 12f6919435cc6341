"""Distributed checkpoints: DCP shards through fsspec, crash-safe commits, exact resume."""

from raytitan.checkpoint.manager import (
    CheckpointManager,
    LoadResult,
    build_checkpoint_storage,
    checkpoint_base,
)
from raytitan.checkpoint.storage import CheckpointError, CheckpointStorage

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointStorage", "LoadResult",
           "build_checkpoint_storage", "checkpoint_base"]
