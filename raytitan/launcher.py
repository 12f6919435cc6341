"""Start a run on Ray: the only module of the training path that imports ray.

It validates the whole config for `ray.num_workers` before anything starts, joins a Ray
cluster (`ray.address`, $RAY_ADDRESS inside `ray job submit`) or starts a local one on
127.0.0.1, prepares the dataset with Ray Data if needed, and runs a TorchTrainer whose
workers each run `raytitan.train.Trainer` with a Ray Data shard reader.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid

import ray
import ray.train
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointUploadMode,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.torch import TorchConfig, TorchTrainer

from raytitan.checkpoint import CheckpointError, build_checkpoint_storage, checkpoint_base
from raytitan.checkpoint.storage import parse_storage_options
from raytitan.config import ConfigError, JobConfig, build_job_config, to_dict
from raytitan.data import resolve_dataset
from raytitan.data.ray_io import prepare_ray, read_shards_ray
from raytitan.plan import build_plan

logger = logging.getLogger("raytitan")

# Ray Data read tasks need CPUs next to the training workers; without spare CPUs they are
# backpressured forever on a 2-core machine (PLATFORM.md), so a local Ray gets at least this many.
_SPARE_CPUS_FOR_DATA = 2


class FinalError(RuntimeError):
    """An error that a restart would raise again (a bad config, a damaged or foreign
    checkpoint, another run's folder, divergence): the run fails at once instead of burning
    ray.max_failures restarts. Transient ones (a lost node, storage hiccups) stay retried."""


class _FailFast(UserCallback):
    """Runs in Ray Train's controller: a worker group failing with FinalError on any rank
    ends the run (an error raised here is final for Ray's failure policy)."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        final = {rank: e for rank, e in worker_exceptions.items()
                 if "FinalError" in f"{type(e).__name__} {e}"}
        if final:
            rank, error = min(final.items())
            raise FinalError(f"rank {rank} failed with an error a restart would repeat, so "
                             f"ray.max_failures is not used: {str(error).strip()[-2000:]}")


def _train_loop_per_worker(config: dict) -> None:
    """Runs in each Ray worker: the same Trainer as under torchrun, fed by Ray Data. After a
    worker-group restart, Ray's latest registered checkpoint is a hint; the Trainer resumes
    from the newest committed step in storage if that is newer (Ray can miss a report made
    just before a crash). `run_id` is this launch's: worker-group restarts share it, so a
    restarted group takes over its own folder lease at once (checkpoint/lease.py)."""
    from raytitan.train import NonFiniteError, Trainer

    os.environ["RAYTITAN_RUN_ID"] = config["run_id"]
    # The fast tier's node: loopback test clusters run several Ray nodes on one host.
    os.environ["RAYTITAN_NODE_ID"] = ray.get_runtime_context().get_node_id()
    cfg = build_job_config(config["job"])
    reported = ray.train.get_checkpoint()
    try:  # everything before training: config, storage, lease, choice, load
        trainer = Trainer(
            cfg,
            read_shards=read_shards_ray,
            report=_report,
            reported_checkpoint=(reported.path.rstrip("/").rsplit("/", 1)[-1] if reported
                                 else None),
            external_retention=True,  # CheckpointConfig(num_to_keep)
            # Ray's notice that a node of this run is being drained (a spot reclaim): save
            # where it survives the node, keep training; Ray restarts the group when the
            # node goes. A barrier across workers, so every rank gets the same answer.
            preemption=_preemption_check(cfg.ray.preemption_check_steps),
            exit_on_preemption=False,
        )
    except (ConfigError, CheckpointError) as e:
        if getattr(e, "retryable", False):
            raise
        raise FinalError(f"{type(e).__name__}: {e}") from e
    try:
        if cfg.checkpoint.create_seed_checkpoint:
            trainer.create_seed_checkpoint()
        else:
            trainer.train()
    except (ConfigError, NonFiniteError) as e:  # save errors (I/O) stay retryable
        raise FinalError(f"{type(e).__name__}: {e}") from e


def _preemption_check(every: int):
    """Asks Ray every `every`-th call (every rank calls it each step, so all ask alike)."""
    calls = [0]

    def check() -> bool:
        calls[0] += 1
        return calls[0] % every == 0 and ray.train.get_preemption_info() is not None

    return check


def _report(metrics: dict, step_dir_name: str | None) -> None:
    """Report metrics, and a committed step directory (already in the Ray run directory, so
    Ray only registers it: no upload)."""
    checkpoint = None
    if step_dir_name:
        storage = ray.train.get_context().get_storage()
        checkpoint = Checkpoint(path=storage.build_checkpoint_path_from_name(step_dir_name),
                                filesystem=storage.storage_filesystem)
    ray.train.report(metrics, checkpoint=checkpoint,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def ray_storage(cfg: JobConfig) -> tuple[str, object | None]:
    """Ray's (storage_path, storage_filesystem): the checkpoint folder, so that the Ray run
    directory <folder>/<job.name> is where the Trainer commits its steps. Remote folders go
    through the same fsspec filesystem (and storage options) as the Trainer's writes."""
    base = checkpoint_base(cfg.checkpoint, cfg.job.dump_folder)
    if "://" not in base:
        return base, None
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(base, **parse_storage_options(cfg.checkpoint.storage_options))
    return path, PyFileSystem(FSSpecHandler(fs))


def init_ray(cfg: JobConfig) -> None:
    """Join the configured cluster, else start a local Ray bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address)
        return
    # NOTE: without this Ray binds a non-loopback address even when told 127.0.0.1.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker + _SPARE_CPUS_FOR_DATA
    num_cpus = max(os.cpu_count() or 1, int(need + 0.999))
    logger.info("starting a local Ray (num_cpus=%d) on 127.0.0.1", num_cpus)
    # NOTE: Ray starts workers at nice 15, so any nice-0 daemon (raylet, GCS, dashboard)
    # preempts a training worker, and FSDP's lockstep collectives make the other rank wait
    # too. Ray does the same for job drivers (see docs/design.md).
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"RAY_worker_niceness": os.environ.get(
                 "RAYTITAN_WORKER_NICENESS", "0")}})


def absolutize(cfg: JobConfig) -> JobConfig:
    """Workers do not share the driver's working directory: pin local paths."""
    def fix(path: str) -> str:
        if not path or "://" in path:
            return path
        return os.path.abspath(os.path.expanduser(path))

    return dataclasses.replace(
        cfg,
        job=dataclasses.replace(cfg.job, dump_folder=fix(cfg.job.dump_folder)),
        model=dataclasses.replace(cfg.model, hf_assets_path=fix(cfg.model.hf_assets_path)),
        data=dataclasses.replace(cfg.data, path=fix(cfg.data.path),
                                 cache_dir=fix(cfg.data.cache_dir)),
        checkpoint=dataclasses.replace(cfg.checkpoint,
                                       initial_load_path=fix(cfg.checkpoint.initial_load_path)),
    )


def elastic_sizes(cfg: JobConfig) -> tuple[int, int]:
    """(min, max) world size. Every size in ray.min_workers..num_workers must fit the mesh
    and the global batch (Ray may start any of them): otherwise a ConfigError names the
    sizes that do not and the ranges that would."""
    low, high = cfg.ray.min_workers or cfg.ray.num_workers, cfg.ray.num_workers
    bad = {}
    for world in range(low, high + 1):
        try:
            build_plan(cfg, world)
        except ConfigError as e:
            bad[world] = str(e)
    if bad:
        valid = [w for w in range(1, high + 1) if w not in bad and _fits(cfg, w)]
        first = min(bad)
        raise ConfigError(
            f"ray.min_workers = {low}, ray.num_workers = {high}: Ray may start any world size "
            f"in between, but {sorted(bad)} do not fit this job (world size {first}: "
            f"{bad[first]}). Sizes up to {high} that fit: {valid}; use ray.min_workers = "
            f"{max(bad) + 1 if max(bad) < high else high} (every size from it up to "
            "num_workers fits), or a global batch more sizes divide")
    if low != high:
        logger.info("elastic: Ray may run this job on %d to %d workers (global batch %d "
                    "each time)", low, high, build_plan(cfg, high).global_batch_size)
    return low, high


def _fits(cfg: JobConfig, world: int) -> bool:
    try:
        build_plan(cfg, world)
    except ConfigError:
        return False
    return True


def launch(cfg: JobConfig) -> ray.train.Result:
    """Validate, start (or join) Ray, prepare data, train. Returns Ray's Result."""
    if cfg.training.warm_restarts:
        raise ConfigError(
            f"training.warm_restarts = {cfg.training.warm_restarts} works under torchrun only; "
            "under Ray set it to 0 and use ray.max_failures (Ray restarts the worker group)")
    plan = build_plan(cfg, cfg.ray.num_workers)  # fails before any worker starts
    logger.info("%s", plan.describe())
    sizes = elastic_sizes(cfg)
    cfg = absolutize(cfg)
    if cfg.checkpoint.enable:  # before Ray validates (and s3fs would create) the bucket
        build_checkpoint_storage(cfg.checkpoint, cfg.job.dump_folder,
                                 cfg.job.name).check_access()
    init_ray(cfg)
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, path=resolve_dataset(cfg.data, prepare_ray)))
    storage_path, storage_filesystem = ray_storage(cfg)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"job": to_dict(cfg), "run_id": uuid.uuid4().hex[:16]},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=sizes if sizes[0] != sizes[1] else sizes[0],
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **{
                name: float(amount) for name, _, amount in
                (entry.partition("=") for entry in cfg.ray.worker_resources)}},
            placement_strategy=cfg.ray.placement_strategy,
            elastic_resize_monitor_interval_s=cfg.ray.resize_check_seconds,
        ),
        run_config=RunConfig(
            name=cfg.job.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_latest_k or None),
            callbacks=[_FailFast()],
        ),
    )
    result = trainer.fit()
    logger.info("run finished: %s", {k: v for k, v in (result.metrics or {}).items()})
    return result
