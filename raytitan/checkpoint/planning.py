"""Who writes and who reads each tensor: Megatron's fully_parallel_save, fully_parallel_load
and ckpt_assume_constant_structure on top of DCP's default planners.

- Save: a tensor several ranks hold (HSDP replicas, TP-replicated norms) is written once.
  Balanced (fully_parallel_save): each copy goes to the holder that has planned the fewest
  bytes so far, so every rank writes about the same; else the lowest holding rank writes it.
- Load (fully_parallel_load): a tensor replicated over dp_replicate is read by one replica,
  owners spread by bytes; the others skip it in their DCP read plan and receive it by a
  broadcast in the replicate group. The bytes in memory are the same either way.
- Plan caching (ckpt_assume_constant_structure): DCP's plan cache, keyed per kind of save
  (full state / model-only export, dtype), so a model-only export never reuses the full
  state's plan. DCP compares every rank's new local plan with the cached one and re-plans
  when the structure changed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.tensor import DTensor, Replicate

REPLICATE_DIM = "dp_replicate"


def save_planner(*, balanced: bool, cache_kind: str | None) -> DefaultSavePlanner:
    """DCP's save planner; `cache_kind`: reuse plans across saves of this kind (None: no)."""
    planner = DefaultSavePlanner(dedup_save_to_lowest_rank=not balanced,
                                 enable_plan_caching=cache_kind is not None)
    if cache_kind is not None:
        planner._cached_plans_key = f"raytitan:{cache_kind}"  # DCP's default: the class name
    return planner


@dataclasses.dataclass
class ReplicaShare:
    """One replicated tensor that this rank receives (or sends) after the read."""

    local: torch.Tensor
    group: dist.ProcessGroup
    owner: int  # group rank of the replica that reads it


class SplitReplicaLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, minus the items another replica reads for this rank."""

    def __init__(self, skip: set[str]) -> None:
        super().__init__()
        self.skip = skip

    def create_local_plan(self):
        plan = super().create_local_plan()
        return dataclasses.replace(
            plan, items=[item for item in plan.items if item.dest_index.fqn not in self.skip])


def split_replicas(request: dict[str, Any]) -> tuple[set[str], list[ReplicaShare]]:
    """For fully_parallel_load: the flattened keys this rank does not read and the tensors
    to broadcast after the read. Every replica computes the same owners (same keys, same
    local shapes), in sorted key order, each tensor to the least-loaded replica."""
    flat, _ = flatten_state_dict(request)
    skip: set[str] = set()
    shares: list[ReplicaShare] = []
    loads: dict[int, list[int]] = {}  # per replicate group (by id): bytes owned per replica
    for fqn in sorted(flat):
        value = flat[fqn]
        if not isinstance(value, DTensor):
            continue
        mesh = value.device_mesh
        names = mesh.mesh_dim_names or ()
        if REPLICATE_DIM not in names:
            continue
        dim = names.index(REPLICATE_DIM)
        if not isinstance(value.placements[dim], Replicate) or mesh.size(dim) < 2:
            continue
        group = mesh.get_group(REPLICATE_DIM)
        bytes_owned = loads.setdefault(id(group), [0] * mesh.size(dim))
        local = value.to_local()
        owner = min(range(len(bytes_owned)), key=lambda r: bytes_owned[r])
        bytes_owned[owner] += local.numel() * local.element_size()
        if dist.get_rank(group) != owner:
            skip.add(fqn)
        shares.append(ReplicaShare(local, group, owner))
    return skip, shares


def broadcast_replicas(shares: list[ReplicaShare]) -> None:
    """After the read: each owner sends what it read to the other replicas (in place)."""
    pending = []
    for share in shares:
        buffer = share.local if share.local.is_contiguous() else share.local.contiguous()
        work = dist.broadcast(buffer, group=share.group, group_src=share.owner, async_op=True)
        pending.append((work, buffer, share.local))
    for work, buffer, local in pending:
        work.wait()
        if buffer is not local:
            local.copy_(buffer)
