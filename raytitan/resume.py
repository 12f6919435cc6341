"""What a resumed run keeps from the config its checkpoint was trained with.

Every difference between the checkpoint's run_config.toml and this run's config is named in
the log, or refused: a run that silently trains with another learning rate or batch than its
checkpoint is a run nobody can reproduce.
    refused  the model's shape (model.name, flavor, vocab_size): the weights cannot load
             (the data position refuses another seed, seq_len or dataset by itself)
    warning  training hyper-parameters, the dataset, the tokenizer size
    info     parallelism, activation checkpointing, compile, training.steps (extending a
             run is common), thread count
With training.global_batch_size = -1 a different mesh would change the global batch; the
run keeps the checkpoint's (more gradient accumulation) or fails if it cannot.
"""

from __future__ import annotations

import dataclasses
import logging

from raytitan.config import ConfigError, JobConfig, redacted, to_dict
from raytitan.plan import build_plan

logger = logging.getLogger("raytitan")

_IGNORED_SECTIONS = ("job", "metrics", "ray", "checkpoint")
_IGNORED = ("data.cache_dir",)
_REFUSED = ("model.name", "model.flavor", "model.vocab_size")
_INFO_SECTIONS = ("parallelism", "activation_checkpoint", "compile")
_INFO = ("training.steps", "training.num_threads")


def config_changes(saved: dict, current: JobConfig) -> list[tuple[str, object, object]]:
    """[(section.key, saved value, this run's value)] for every field that differs; fields
    the saved config lacks (an older raytitan) are not compared."""
    changes = []
    for section, values in to_dict(redacted(current)).items():
        if section in _IGNORED_SECTIONS or not isinstance(saved.get(section), dict):
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if name in _IGNORED or key not in saved[section]:
                continue
            if saved[section][key] != value:
                changes.append((name, saved[section][key], value))
    return changes


def check_resume_config(cfg: JobConfig, *, saved: dict | None, commit: dict | None,
                        world_size: int, model_loaded: bool = True,
                        verbose: bool = True) -> JobConfig:
    """Log or refuse each change against the checkpoint's config; returns the config to run
    (global_batch_size pinned to the checkpoint's where -1 would change it).

    Args:
        saved: the checkpoint's run_config.toml ({section: {key: value}}), or None.
        commit: its COMMIT.json (global_batch_size, step).
        model_loaded: False when the model is not loaded (exclude_from_loading = model).
        verbose: log the changes (rank 0; the other ranks only decide alike).
    Raises:
        ConfigError naming the field and both values.
    """
    where = f"step-{commit.get('step')}" if commit else "the checkpoint"

    def log(level: int, message: str, *args) -> None:
        if verbose:
            logger.log(level, message, *args)

    for name, old, new in config_changes(saved or {}, cfg):
        text = f"resume: {name} = {new!r}, but {where} was trained with {old!r}"
        if name in _REFUSED and model_loaded:
            raise ConfigError(f"{text}: its weights cannot be loaded into this model. Resume "
                              f"with {name} = {old!r}, or start a new run (another job.name)")
        if name in _INFO or name.split(".")[0] in _INFO_SECTIONS:
            log(logging.INFO, "%s", text)
        elif name != "training.global_batch_size":
            log(logging.WARNING, "%s", text)
    saved_batch = (commit or {}).get("global_batch_size")
    if saved_batch is None:
        return cfg
    plan = build_plan(cfg, world_size)
    per_micro_step = cfg.training.local_batch_size * plan.parallel_dims.dp
    if cfg.training.global_batch_size == -1 and plan.global_batch_size != saved_batch:
        if saved_batch % per_micro_step:
            raise ConfigError(
                f"resume: training.global_batch_size = -1 means {plan.global_batch_size} on "
                f"this mesh, but {where} was trained with a global batch of {saved_batch}, "
                f"which is not a multiple of local_batch_size "
                f"({cfg.training.local_batch_size}) * dp ({plan.parallel_dims.dp}); set "
                "training.global_batch_size explicitly")
        log(logging.WARNING, "resume: keeping %s's global batch of %d (training.global_batch_size "
                       "= -1 would mean %d on this mesh): gradient accumulation %d",
                       where, saved_batch, plan.global_batch_size,
                       saved_batch // per_micro_step)
        return dataclasses.replace(cfg, training=dataclasses.replace(
            cfg.training, global_batch_size=saved_batch))
    if plan.global_batch_size != saved_batch:
        log(logging.WARNING, "resume: the global batch changes from %d (%s) to %d: gradient "
                       "accumulation %d", saved_batch, where, plan.global_batch_size,
                       plan.grad_accum_steps)
    return cfg
