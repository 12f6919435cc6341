"""Build the Trainer's model under torchrun, run one forward, and write what was applied.

    torchrun --nproc-per-node 2 tests/distributed/inspect_model.py REPORT_DIR [--no-forward] \
        --section.key value ...

Writes REPORT_DIR/rank<r>.json per rank: each parameter of `trainer.model_parts` (name,
DTensor or not, placements per mesh dim, local shape, dtype), the modules wrapped in
activation checkpointing ("full", or "selective" when it has a context_fn: the SAC policy),
the compiled modules, the FSDP modules, and the dtype that the
first block's `attention.wq` receives in a forward (None with --no-forward or under PP,
whose forward needs the schedule). Nothing is trained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.eval_frame import OptimizedModule
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from raytitan.config import load_job_config
from raytitan.models.llama3.model import canonical_name
from raytitan.train import Trainer


def describe_param(name: str, param: torch.Tensor) -> dict:
    is_dtensor = isinstance(param, DTensor)
    local = param.to_local() if is_dtensor else param
    return {
        "fqn": name,
        "name": canonical_name(name),
        "dtensor": is_dtensor,
        "placements": [repr(p) for p in param.placements] if is_dtensor else [],
        "mesh_dims": list(param.device_mesh.mesh_dim_names or ()) if is_dtensor else [],
        "local_shape": list(local.shape),
        "dtype": str(param.dtype),
    }


def forward_dtype(trainer: Trainer) -> str | None:
    """The dtype of the activations entering the first block's attention.wq in a forward."""
    model = trainer.model_parts[0]
    wq = next(m for n, m in model.named_modules() if canonical_name(n).endswith("attention.wq"))
    seen: list[torch.dtype] = []
    handle = wq.register_forward_hook(lambda mod, args, out: seen.append(args[0].dtype))
    gen = torch.Generator().manual_seed(0)  # the same tokens on every rank (TP needs that)
    shape = (2, trainer.cfg.training.seq_len)
    tokens = torch.randint(0, trainer.plan.model_args.vocab_size, shape, generator=gen)
    with torch.no_grad(), trainer.autocast:
        model(tokens.to(trainer.device))
    handle.remove()
    return str(seen[0])


def main(argv: list[str]) -> None:
    report_dir, argv = Path(argv[0]), argv[1:]
    run_forward = "--no-forward" not in argv
    argv = [a for a in argv if a != "--no-forward"]
    trainer = Trainer(load_job_config(None, argv))
    report = {
        "world_size": dist.get_world_size(),
        "params": [describe_param(n, p) for part in trainer.model_parts
                   for n, p in part.named_parameters()],
        "checkpoint_wrapped": {}, "compiled": [], "fsdp": [],
    }
    for part in trainer.model_parts:
        for name, module in part.named_modules():
            if isinstance(module, CheckpointWrapper):
                selective = "context_fn" in module.checkpoint_fn.keywords
                report["checkpoint_wrapped"][canonical_name(name)] = (
                    "selective" if selective else "full")
            # torch.compile(module) wraps it; module.compile() sets _compiled_call_impl.
            if (isinstance(module, OptimizedModule)
                    or getattr(module, "_compiled_call_impl", None) is not None):
                report["compiled"].append(canonical_name(name))
            if isinstance(module, FSDPModule):
                report["fsdp"].append(canonical_name(name))
    pp = trainer.plan.parallel_dims.pp_enabled
    report["forward_dtype"] = forward_dtype(trainer) if run_forward and not pp else None
    trainer.stream.close()
    trainer.metrics.close()
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
