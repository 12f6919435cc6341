"""Opening a run's checkpoint folder, before anything is built or written: check that its
storage can be used, take the lease, read the run id, delete this run's own interrupted
saves and choose the step to resume from. Rank 0 does the I/O; every rank gets the result
or the same error."""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass

from raytitan.checkpoint.collectives import on_rank0
from raytitan.checkpoint.lease import FolderLease, folder_lineage
from raytitan.checkpoint.selection import ResumeChoice, choose_step
from raytitan.checkpoint.storage import CheckpointError, CheckpointStorage, step_name
from raytitan.config.job_config import Checkpoint as CheckpointConfig

logger = logging.getLogger("raytitan")

RUN_CONFIG_FILE = "run_config.toml"


@dataclass
class OpenFolder:
    lineage: str
    """This folder's run id: written into every commit."""
    choice: ResumeChoice
    saved_config: dict | None
    """The run_config.toml of the chosen step (None if there is none)."""
    lease: FolderLease | None = None
    """Rank 0 only (None with load_only, which never writes)."""


def check_folder_hosts(storage: CheckpointStorage, hosts: list[str], *, shared: bool) -> None:
    """A local checkpoint folder on a multi-node run: each node would hold its own ranks'
    shards and no node a whole step. Refused unless it is declared shared (NFS, Lustre)."""
    nodes = sorted(set(hosts))
    if storage.is_local and len(nodes) > 1 and not shared:
        raise CheckpointError(
            f"checkpoint.folder {storage.url} is a local path, but this run spans "
            f"{len(nodes)} nodes ({', '.join(nodes[:4])}{', ...' if len(nodes) > 4 else ''}): "
            "every node would write its own ranks' shards and none a loadable step. Use "
            "shared storage (s3://...), or set checkpoint.shared_filesystem = true if this "
            "path is one filesystem mounted on every node")


def open_folder(cfg: CheckpointConfig, storage: CheckpointStorage, *, job: str,
                reported_step: int | None = None, group=None) -> OpenFolder:
    """Collective. Args: the [checkpoint] section, the run's folder, the job name, Ray's
    latest registered step after a restart. Raises CheckpointError (every rank)."""
    lease: list[FolderLease] = []

    def work() -> OpenFolder:
        storage.check_access()
        if not cfg.load_only:
            lease.append(FolderLease(storage, job=job, timeout=cfg.lease_timeout))
            lease[0].acquire()
        try:
            return _choose(cfg, storage, reported_step, writer=not cfg.load_only)
        except Exception:
            if lease:
                lease[0].release()
            raise

    folder = on_rank0(work, group)
    if lease:
        folder.lease = lease[0]
    return folder


def _choose(cfg: CheckpointConfig, storage: CheckpointStorage, reported_step: int | None,
            *, writer: bool) -> OpenFolder:
    if writer:
        lineage, created = folder_lineage(storage)
        if created:
            logger.info("checkpoint: %s is a new run folder (run id %s)", storage.url, lineage)
    else:
        run = storage.read_run()
        lineage = run["lineage"] if run else "-"
    steps = storage.list_steps()
    choice = choose_step(steps, lineage=lineage, load_step=cfg.load_step,
                         reported_step=reported_step, where=storage.url)
    for warning in choice.warnings:
        logger.warning("%s", warning)
    if cfg.load_step >= 0 and reported_step is not None:
        logger.warning("checkpoint: Ray restarted this run after it committed %s, so it "
                       "resumes from its newest step, not load_step = %d",
                       step_name(reported_step), cfg.load_step)
    elif reported_step is not None and choice.step is not None and reported_step != choice.step:
        logger.info("checkpoint: Ray's latest registered checkpoint is %s, but %s is the "
                    "newest committed step in storage: resuming from it",
                    step_name(reported_step), step_name(choice.step))
    if writer:
        for step in choice.remove:
            logger.info("checkpoint: removing %s, this run's interrupted save",
                        storage.step_url(step))
            storage.remove_step(step)
    saved = None
    if choice.step is not None:
        try:
            with storage.fs.open(storage.step_path(choice.step, RUN_CONFIG_FILE), "rb") as f:
                saved = tomllib.load(f)
        except FileNotFoundError:
            pass
    return OpenFolder(lineage, choice, saved)
