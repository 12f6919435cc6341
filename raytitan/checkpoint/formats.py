"""Where another checkpoint format plugs into a run, without this package knowing it: the
Trainer builds both for Hugging Face folders and hands them to the CheckpointManager,
which keeps the collectives, the ordering, the error handling and the logs.

    StepExport    checkpoint.last_save_in_hf: the final step, also in another format, in
                  <step>/<dirname> and covered by the step's commit.
    InitialLoad   checkpoint.initial_load_in_hf: a fresh run's model from another format's
                  folder (checkpoint.initial_load_path).
"""

from __future__ import annotations

from typing import Protocol

from torch import nn


class StepExport(Protocol):
    dirname: str
    """Its folder inside the step; the commit manifest records it under this key too."""

    def write_shards(self, step_url: str, rank: int, world_size: int) -> dict[str, dict]:
        """Every rank, before the commit: write this rank's share of the export of the
        (written, not yet committed) step. Returns {name in dirname: {size, crc32}}."""
        ...

    def write_rest(self, step_url: str, tokenizer_files: dict[str, bytes]
                   ) -> dict[str, dict]:
        """Rank 0, after every rank's write_shards: the rest of the export, given the
        step's tokenizer files by name. Returns {name in dirname: {size, crc32}}."""
        ...


class InitialLoad(Protocol):
    def check(self, folder: str) -> None:
        """Rank 0: raise OSError or ValueError unless `folder` fits this run's model."""
        ...

    def fill(self, folder: str, model_parts: list[nn.Module]) -> None:
        """Every rank: fill this rank's model parts from `folder` (checked)."""
        ...
