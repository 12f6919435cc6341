"""Cross-section checks and derived sizes of a run, for a given world size.

Everything here is arithmetic: it runs before any worker starts (launcher, `--dry-run`) and
again inside each worker, so a bad mesh or batch fails with the same message everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raytitan.config.job_config import ConfigError, JobConfig
from raytitan.models.llama3 import LLAMA3_FLAVORS, Llama3Args
from raytitan.models.llama3.pipeline import STAGES_PER_RANK
from raytitan.parallel.parallel_dims import ParallelDims


@dataclass
class RunPlan:
    parallel_dims: ParallelDims
    model_args: Llama3Args
    global_batch_size: int
    """Samples per optimizer step over all ranks."""
    grad_accum_steps: int
    """Micro-steps per optimizer step on each rank."""
    pp_microbatches: int
    """Pipeline microbatches per local batch (1 without PP)."""
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def describe(self) -> str:
        a = self.model_args
        return "\n".join([
            f"mesh:   {self.parallel_dims.describe()}",
            f"model:  {a.num_params() / 1e9:.3f} B params ({a.n_layers} layers, dim {a.dim}, "
            f"{a.n_heads} heads / {a.n_kv_heads} kv heads, vocab {a.vocab_size})",
            f"batch:  global {self.global_batch_size} = local "
            f"{self.global_batch_size // (self.parallel_dims.dp * self.grad_accum_steps)} x dp "
            f"{self.parallel_dims.dp} x grad accumulation {self.grad_accum_steps}"
            + (f"; {self.pp_microbatches} pipeline microbatches" if self.parallel_dims.pp > 1
               else ""),
            f"tokens: {self.tokens_per_step:,} per step (seq_len {self.seq_len}); "
            f"{a.flops_per_token(self.seq_len) / 1e9:.2f} GFLOP per token",
        ])


def model_args_for(cfg: JobConfig, vocab_size: int | None = None) -> Llama3Args:
    """The flavor's args with vocab from config (or the tokenizer, for `debug`) and
    max_seq_len = training.seq_len."""
    args = LLAMA3_FLAVORS[cfg.model.flavor]
    vocab = cfg.model.vocab_size or (
        vocab_size if cfg.model.flavor == "debug" and vocab_size else args.vocab_size)
    return dataclasses.replace(args, vocab_size=vocab, max_seq_len=cfg.training.seq_len)


def build_plan(cfg: JobConfig, world_size: int, vocab_size: int | None = None) -> RunPlan:
    """Validate `cfg` for `world_size` processes; raises ConfigError naming the values."""
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    args = model_args_for(cfg, vocab_size)
    t, par = cfg.training, cfg.parallelism
    if dims.tp > 1:
        for name, value in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
                            ("ffn hidden dim", args.ffn_hidden_dim)):
            if value % dims.tp:
                raise ConfigError(
                    f"model {cfg.model.flavor}: {name} ({value}) is not divisible by "
                    f"tensor_parallel_degree ({dims.tp})"
                )
        if t.seq_len % dims.tp:
            raise ConfigError(f"training.seq_len ({t.seq_len}) must be divisible by "
                              f"tensor_parallel_degree ({dims.tp}) for sequence parallel")
    if args.tie_word_embeddings and (dims.tp > 1 or dims.pp > 1):
        raise ConfigError(
            f"model {cfg.model.flavor} ties input and output embeddings, which is supported "
            f"with FSDP/HSDP only; got tensor_parallel_degree={dims.tp}, "
            f"pipeline_parallel_degree={dims.pp} (use 1 for both)"
        )
    ckpt = cfg.checkpoint
    for name in ("initial_load_in_hf", "last_save_in_hf"):
        if getattr(ckpt, name) and not ckpt.enable:
            raise ConfigError(f"checkpoint.{name} = true needs checkpoint.enable = true")
    if ckpt.initial_load_in_hf and not (ckpt.initial_load_path or cfg.model.hf_assets_path):
        raise ConfigError("checkpoint.initial_load_in_hf = true needs a Hugging Face folder: "
                          "set model.hf_assets_path (or checkpoint.initial_load_path)")
    microbatches = 1
    if dims.pp > 1:
        num_stages = dims.pp * STAGES_PER_RANK[par.pipeline_parallel_schedule]
        if num_stages > args.n_layers:
            raise ConfigError(
                f"{par.pipeline_parallel_schedule} with pipeline_parallel_degree {dims.pp} needs "
                f"{num_stages} stages but model {cfg.model.flavor} has {args.n_layers} layers"
            )
        microbatches = dims.pp if par.microbatches == -1 else par.microbatches
        schedule = par.pipeline_parallel_schedule
        if schedule == "1F1B" and microbatches < dims.pp:
            raise ConfigError(f"1F1B needs parallelism.microbatches ({microbatches}) >= "
                              f"pipeline_parallel_degree ({dims.pp})")
        rounds = max(1, microbatches // dims.pp)
        if schedule == "Interleaved1F1B" and microbatches % rounds:
            raise ConfigError(
                f"Interleaved1F1B needs parallelism.microbatches ({microbatches}) to be a "
                f"multiple of microbatches // pipeline_parallel_degree ({rounds})")
        if t.local_batch_size % microbatches:
            raise ConfigError(
                f"training.local_batch_size ({t.local_batch_size}) must be divisible by "
                f"parallelism.microbatches ({microbatches})"
            )
    per_micro_step = t.local_batch_size * dims.dp
    global_batch = per_micro_step if t.global_batch_size == -1 else t.global_batch_size
    if global_batch % per_micro_step:
        raise ConfigError(
            f"training.global_batch_size ({global_batch}) must be a multiple of "
            f"local_batch_size ({t.local_batch_size}) * dp degree ({dims.dp}) = {per_micro_step}"
        )
    return RunPlan(dims, args, global_batch, global_batch // per_micro_step, microbatches,
                   t.seq_len)
