"""Pipeline parallel: split Llama-3 into stages and build a torch.distributed.pipelining
schedule. Stages keep the global layer names, so checkpoints reshard across PP degrees."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.pipelining.schedules import _PipelineSchedule

from raytitan.models.llama3.model import Llama3

# Stages each pipeline rank holds, per schedule.
STAGES_PER_RANK = {"GPipe": 1, "1F1B": 1, "Interleaved1F1B": 2}


def stage_layer_ranges(n_layers: int, num_stages: int) -> list[range]:
    """Split layers as evenly as possible; earlier stages take the remainder."""
    base, extra = divmod(n_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        size = base + (1 if s < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def split_into_stages(model: Llama3, pp_rank: int, pp_degree: int, schedule: str) -> list[
        tuple[int, Llama3]]:
    """The (stage index, stage module) pairs this pipeline rank owns. Rank r holds stages
    r, r + pp, ... (the loop layout interleaved schedules expect). `model` is on meta."""
    num_stages = pp_degree * STAGES_PER_RANK[schedule]
    ranges = stage_layer_ranges(model.args.n_layers, num_stages)
    stages = []
    for stage_idx in range(pp_rank, num_stages, pp_degree):
        stage = copy.deepcopy(model)
        keep = {str(i) for i in ranges[stage_idx]}
        for name in list(stage.layers.keys()):
            if name not in keep:
                del stage.layers[name]
        if stage_idx != 0:
            stage.tok_embeddings = None
        if stage_idx != num_stages - 1:
            stage.norm = None
            stage.output = None
        stages.append((stage_idx, stage))
    return stages


def build_pipeline_schedule(
    stages: list[tuple[int, torch.nn.Module]],
    *,
    schedule: str,
    pp_degree: int,
    pp_mesh: DeviceMesh,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
) -> _PipelineSchedule:
    """Wrap stage modules in PipelineStages and build the named schedule.

    NOTE: scale_grads is off: it divides the whole accumulated .grad at the end of every
    step(), which also shrinks the gradients of earlier accumulation steps. `loss_fn` must
    divide by the microbatch count itself."""
    num_stages = pp_degree * STAGES_PER_RANK[schedule]
    pipeline_stages = [
        PipelineStage(module, idx, num_stages, device, group=pp_mesh.get_group())
        for idx, module in stages
    ]
    if schedule == "Interleaved1F1B":
        return ScheduleInterleaved1F1B(pipeline_stages, n_microbatches=n_microbatches,
                                       loss_fn=loss_fn, scale_grads=False)
    cls = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}[schedule]
    return cls(pipeline_stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn,
               scale_grads=False)
