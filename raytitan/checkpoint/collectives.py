"""Run checkpoint I/O on rank 0 or on every rank so that every rank gets the same result or
the same error: a rank that raised alone would leave the others waiting in a collective."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from raytitan.checkpoint.storage import CheckpointError


def on_rank0(fn, group=None) -> Any:
    """Run fn on rank 0 and give every rank its result, or raise its error on every rank
    (so no rank is left waiting in a collective)."""
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # re-raised on every rank below
            box[0] = ("error", e if isinstance(e, CheckpointError) else
                      CheckpointError(f"{type(e).__name__}: {e}"))
    dist.broadcast_object_list(box, src=0, group=group)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def on_every_rank(fn: Callable[[], Any], what: str, group=None) -> list[Any]:
    """Run fn on every rank and return every rank's result, or raise all ranks' errors
    on every rank (so none is left waiting in a later collective)."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:
        error = f"rank {dist.get_rank()}: {type(e).__name__}: {e}"
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (result, error), group=group)
    if errors := [e for _, e in gathered if e]:
        raise CheckpointError(f"{what} failed: {'; '.join(errors)}")
    return [r for r, _ in gathered]
