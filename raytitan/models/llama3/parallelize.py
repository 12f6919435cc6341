"""Apply tensor parallel, activation checkpointing, compile and FSDP2 to a Llama-3 (stage).

The order matters and is fixed: TP first (it rewrites Linear weights into DTensors),
then activation checkpointing and compile (they wrap blocks), then FSDP2 last (it shards
whatever parameters the earlier steps left, and its hooks must wrap the outermost modules).
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from raytitan.config.job_config import ActivationCheckpoint, Compile, Training
from raytitan.models.llama3.model import Llama3
from raytitan.parallel.parallel_dims import ParallelDims

logger = logging.getLogger(__name__)

# Tensor-parallel plan of one transformer block, with sequence parallel on the norms: the
# residual stream stays sharded on the sequence dim (Shard(1)) between blocks.
BLOCK_TP_PLAN = {
    "attention_norm": SequenceParallel(),
    "attention": PrepareModuleInput(
        input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
    ),
    "attention.wq": ColwiseParallel(),
    "attention.wk": ColwiseParallel(),
    "attention.wv": ColwiseParallel(),
    "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
    "ffn_norm": SequenceParallel(),
    "feed_forward": PrepareModuleInput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
    ),
    "feed_forward.w1": ColwiseParallel(),
    "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    "feed_forward.w3": ColwiseParallel(),
}

# Plan of the embedding, final norm and output projection (those a stage owns).
OUTER_TP_PLAN = {
    "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
    "norm": SequenceParallel(),
    # Replicated logits, so the loss is a plain cross entropy on every TP rank.
    "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
}


def parallelize_llama3(
    model: Llama3,
    parallel_dims: ParallelDims,
    *,
    training: Training,
    activation_checkpoint: ActivationCheckpoint,
    compile_cfg: Compile,
) -> Llama3:
    """Parallelize `model` (a whole model or one pipeline stage) in place and return it."""
    mesh = parallel_dims.mesh
    if parallel_dims.tp_enabled:
        apply_tp(model, mesh["tp"])
    if activation_checkpoint.mode != "none":
        apply_ac(model, activation_checkpoint.mode)
    if compile_cfg.enable:
        apply_compile(model, clone_embedding_output=parallel_dims.tp_enabled)
    if parallel_dims.dp_enabled:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if parallel_dims.dp_replicate > 1 else (
            mesh["dp_shard"])
        mp_policy = MixedPrecisionPolicy(
            param_dtype=getattr(torch, training.mixed_precision_param),
            reduce_dtype=getattr(torch, training.mixed_precision_reduce),
        )
        apply_fsdp(model, dp_mesh, mp_policy, reshard_after_forward=not parallel_dims.pp_enabled)
    return model


def apply_tp(model: Llama3, tp_mesh: DeviceMesh) -> None:
    """Shard Linear weights over `tp_mesh` by the plans above."""
    outer = {name: style for name, style in OUTER_TP_PLAN.items() if getattr(model, name)}
    if outer:
        parallelize_module(model, tp_mesh, outer)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, BLOCK_TP_PLAN)
    logger.info("applied tensor parallel (degree %d) with sequence parallel", tp_mesh.size())


# Ops whose outputs selective activation checkpointing keeps (the expensive ones to redo).
_SAC_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _sac_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAC_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: Llama3, mode: str) -> None:
    """Wrap each block in activation checkpointing ('full' or 'selective')."""
    for name, block in model.layers.items():
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(
                block,
                context_fn=lambda: create_selective_checkpoint_contexts(_sac_policy),
                preserve_rng_state=False,
            )
        model.layers[name] = wrapped
    logger.info("applied %s activation checkpointing", mode)


def apply_compile(model: Llama3, *, clone_embedding_output: bool) -> None:
    """torch.compile each block (the blocks are identical, so one compile is reused)."""
    if clone_embedding_output and model.tok_embeddings is not None:
        # NOTE: with TP, a compiled first block that reads the embedding's output directly
        # silently zeroes the embedding's gradient (PLATFORM.md); a clone breaks the alias.
        model.tok_embeddings.register_forward_hook(lambda mod, inp, out: out.clone())
    for name, block in model.layers.items():
        model.layers[name] = torch.compile(block, fullgraph=True)
    logger.info("compiled each transformer block")


def apply_fsdp(
    model: Llama3,
    dp_mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy,
    *,
    reshard_after_forward: bool,
) -> None:
    """FSDP2 per block, then the root (embedding, norm, output). A 2-D mesh means HSDP."""
    kwargs = {"mesh": dp_mesh, "mp_policy": mp_policy}
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's params are needed right away by backward: keep them unsharded.
        last = i == len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard_after_forward and not last, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    logger.info("applied FSDP2 on mesh %s", dp_mesh)
