"""Helpers that work the same on plain tensors and DTensors (FSDP2, TP, both)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor


@torch.no_grad()
def fill_param(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full-shape tensor `full` into `param` (no communication)."""
    if isinstance(param, DTensor):
        part = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(part.to_local())
    else:
        param.copy_(full)


@torch.no_grad()
def clip_grad_norm_(
    parameters: list[torch.Tensor], max_norm: float, pp_mesh: DeviceMesh | None = None
) -> torch.Tensor:
    """Clip gradients to a total L2 norm of `max_norm` (0 = only measure); returns the norm.

    NOTE: torch.nn.utils.clip_grad_norm_ fails when TP and FSDP grads live on different meshes
    (PLATFORM.md). Here the squared norm of each group of grads sharing (mesh, placements) is
    summed locally and all-reduced over the mesh dims those grads are sharded on; replicated
    dims are not summed. Pipeline stages hold disjoint parameters, so `pp_mesh` sums over them.
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            # Replicated params used on sequence-sharded inputs (SP norms) get Partial grads:
            # reduce them now (the optimizer would otherwise do it implicitly per step).
            g = p.grad = g.redistribute(
                placements=[Replicate() if pl.is_partial() else pl for pl in g.placements])
        if isinstance(g, DTensor):
            groups.setdefault((g.device_mesh, tuple(g.placements)), []).append(g.to_local())
        else:
            groups.setdefault((), []).append(g)
    device = next(iter(groups.values()))[0].device if groups else torch.device("cpu")
    total_sq = torch.zeros((), device=device, dtype=torch.float32)
    for key, grads in groups.items():
        norms = torch._foreach_norm(grads, 2.0)
        sq = torch.stack([n.float() for n in norms]).square().sum()
        if key:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                # NOTE: not is_shard(): FSDP2 over TP shards dim 0 as _StridedShard, whose
                # is_shard() is False (torch 2.13). Partial grads were made Replicate above.
                if not placement.is_replicate():
                    dist.all_reduce(sq, group=mesh.get_group(dim))
        total_sq += sq
    if pp_mesh is not None and pp_mesh.size() > 1:
        dist.all_reduce(total_sq, group=pp_mesh.get_group())
    total = total_sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total
