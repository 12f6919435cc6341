"""Loading one committed step: check its files (sizes and CRC32s), apply
dist_ckpt_strictness to the keys this run asks for, load them with DCP (resharding onto
this run's mesh) and hand them to their owners. Every method is called on every rank and
every rank raises the same error."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from raytitan.checkpoint.collectives import on_rank0
from raytitan.checkpoint.planning import (
    SplitReplicaLoadPlanner,
    broadcast_replicas,
    split_replicas,
)
from raytitan.checkpoint.shards import step_reader
from raytitan.checkpoint.state import StepContents, rng_state
from raytitan.checkpoint.storage import (
    CHECKSUMS_FILE,
    CheckpointError,
    CheckpointStorage,
    describe_error,
)
from raytitan.config.job_config import Checkpoint as CheckpointConfig

logger = logging.getLogger("raytitan")


@dataclass
class LoadResult:
    step: int
    """The step of the checkpoint loaded (0 for a seed checkpoint)."""
    path: str
    keys: list[str]
    """Top-level keys loaded."""
    unexpected: list[str]
    """Keys this run asked for that the checkpoint lacks (Megatron's 'unexpected')."""
    missing: list[str]
    """Keys the checkpoint holds that no rank asked for (Megatron's 'missing')."""


class StepLoader:
    """Loads committed steps into this rank's `contents`.

    Args:
        cfg: the [checkpoint] section (verify_integrity, load_optim, load_rng,
            exclude_from_loading, dist_ckpt_strictness).
        contents: this rank's owners of the step's keys.
        pg: the group DCP loads on.
        ctrl: the group of the checks and key agreement.
    """

    def __init__(self, cfg: CheckpointConfig, contents: StepContents, *, pg, ctrl) -> None:
        self.cfg = cfg
        self.contents = contents
        self.states = contents.states
        self.pg = pg
        self.ctrl = ctrl
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.last_read_bytes = 0  # by the last load, this rank

    def _on_rank0(self, fn) -> Any:
        return on_rank0(fn, self.ctrl)

    def _verify(self, storage: CheckpointStorage, step: int, commit: dict,
                others: list[int]) -> dict[str, dict]:
        """Always (rank 0): every file's size, the CRC32 of .metadata and checksums.json;
        returns the per-item CRC32s the reader checks while loading. With verify_integrity
        also every file's CRC32 (files split over ranks). Every rank raises the same error."""
        def damaged(problems: list[str]) -> CheckpointError:
            return damaged_error(storage, step, problems, others)

        def small_files() -> dict[str, dict]:
            if problems := storage.check_sizes(step, commit):
                raise damaged(problems)
            if problems := storage.check_crc(step, commit, [".metadata", CHECKSUMS_FILE]):
                raise damaged(problems)
            return {name: entry[2] for name, entry in storage.read_checksums(step).items()
                    if len(entry) > 2 and entry[2]}

        items = self._on_rank0(small_files)
        if not items and commit["files"].get(".metadata", {}).get("crc32") is not None:
            logger.warning("checkpoint: %s records no per-item CRC32 (an older raytitan): "
                           "its shards are loaded with size checks only",
                           storage.step_url(step))
        if not self.cfg.verify_integrity:
            return items
        names = sorted(commit["files"])[self.rank::self.world_size]
        try:
            problems = storage.check_crc(step, commit, names)
        except Exception as e:
            problems = [f"reading on rank {self.rank} failed: {type(e).__name__}: {e}"]
        gathered: list[list[str]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(gathered, problems, group=self.ctrl)
        problems = [p for rank_problems in gathered for p in rank_problems]
        if problems:
            raise damaged(problems)
        logger.info("checkpoint: verified CRC32 of %d files of %s", len(commit["files"]),
                    storage.step_url(step))
        return items

    def load(self, storage: CheckpointStorage, step: int, commit: dict,
             model_only: bool, others: list[int]) -> LoadResult:
        """Load `step` of `storage` (its `commit` manifest; `others`: the folder's other
        committed steps, named when it is damaged). Raises CheckpointError."""
        cfg = self.cfg
        start = time.perf_counter()
        items = self._verify(storage, step, commit, others)
        url = storage.step_url(step)
        reader = step_reader(url, storage.options, items, cfg.thread_count)
        stored: set[str] = self._on_rank0(
            lambda: set(step_reader(url, storage.options).read_metadata().state_dict_metadata))
        stored_groups = {key.split(".", 1)[0] for key in stored}

        groups = ["model"] if model_only else ["model", "optimizer", *self.states]
        if not cfg.load_optim and "optimizer" in groups:
            groups.remove("optimizer")
        request: dict[str, Any] = {}
        part_keys: dict[str, list[list[str]]] = {}  # model/optimizer: each part's keys
        for group in groups:
            if group in cfg.exclude_from_loading:
                logger.info("checkpoint: not loading %s (exclude_from_loading)", group)
            elif group not in stored_groups:
                logger.info("checkpoint: %s has no %s; not loaded", url, group)
            elif group in ("model", "optimizer"):
                parts = self.contents.part_states(group)
                part_keys[group] = [list(part) for part in parts]
                request[group] = {k: v for part in parts for k, v in part.items()}
            else:
                request[group] = dict(self.states[group].state_dict())
        want_rng = not model_only and cfg.load_rng and "rng" not in cfg.exclude_from_loading
        rank_key = f"rank{self.rank}"
        # Only the generators this checkpoint has (a CPU run has no CUDA state).
        rng = {k: v for k, v in rng_state().items() if f"rng.{rank_key}.{k}" in stored}
        if want_rng and rng:
            request["rng"] = {rank_key: rng}
        elif want_rng and "rng" in stored_groups:
            logger.warning("checkpoint: %s has no RNG state for rank %d (saved with world "
                           "size %s); this rank keeps its own", url, self.rank,
                           commit.get("world_size"))

        unexpected, missing = self._check_keys(request, stored, url)
        skipped = {}  # not in the checkpoint: these keep the value this run initialized
        for key in unexpected:
            group, _, name = key.partition(".")
            if group in request and name in request[group]:
                skipped[key] = request[group].pop(name)
        # fully_parallel_load: replicated tensors read by one replica each, then broadcast
        skip, shares = split_replicas(request) if cfg.fully_parallel_load else (set(), [])
        try:
            dcp.load(request, storage_reader=reader, planner=SplitReplicaLoadPlanner(skip),
                     process_group=self.pg)
            broadcast_replicas(shares)
        except (Exception, CheckpointException) as e:
            if "do not match the CRC32" in describe_error(e):
                raise damaged_error(storage, step, [describe_error(e)], others) from e
            raise CheckpointError(
                f"loading {url} failed (dist_ckpt_strictness = {cfg.dist_ckpt_strictness}): "
                f"{describe_error(e)}") from e
        for key, value in skipped.items():
            group, _, name = key.partition(".")
            request[group][name] = value
        self.contents.apply(request, part_keys)
        seconds = time.perf_counter() - start
        self.last_read_bytes = reader.read_bytes
        read: list[Any] = [None] * self.world_size
        dist.all_gather_object(read, reader.read_bytes, group=self.ctrl)
        logger.info("checkpoint: loaded %s of %s in %.2f s (CRC32 of %d items checked on "
                    "this rank; bytes read per rank: %s%s)", sorted(request), url, seconds,
                    reader.checked_items, read,
                    f"; fully_parallel_load: {len(skip)} replicated tensors read by another "
                    "replica on this rank" if cfg.fully_parallel_load else "")
        return LoadResult(step, url, sorted(request), unexpected, missing)

    def _check_keys(self, request: dict[str, Any], stored: set[str],
                    url: str) -> tuple[list[str], list[str]]:
        """Apply dist_ckpt_strictness. Megatron's terms: 'unexpected' keys are requested by
        this run but absent from the checkpoint; 'missing' keys are in the checkpoint (in the
        groups being loaded) but requested by no rank. Decided on the union over ranks, so
        every rank raises or loads alike."""
        mode = self.cfg.dist_ckpt_strictness
        if mode == "assume_ok_unexpected":
            return [], []  # no check: DCP itself fails on a key the checkpoint lacks
        flat = {f"{group}.{key}" for group, values in request.items() if group != "rng"
                for key in values}
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, sorted(flat - stored), group=self.ctrl)
        unexpected = sorted({k for keys in gathered for k in keys})
        missing: list[str] = []
        if mode.endswith("_all"):
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, sorted(flat), group=self.ctrl)
            requested = {k for keys in gathered for k in keys}
            groups = {g for g in request if g != "rng"}
            missing = sorted(k for k in stored
                             if k.split(".", 1)[0] in groups and k not in requested)
        mismatch = (f"{len(unexpected)} requested key(s) absent from {url} "
                    f"(e.g. {unexpected[:3]}); {len(missing)} key(s) of it not requested "
                    f"(e.g. {missing[:3]})")
        if mode == "raise_unexpected" and unexpected or mode == "raise_all" and (
                unexpected or missing):
            raise CheckpointError(f"dist_ckpt_strictness = {mode}: {mismatch}")
        if mode.startswith("log") and (unexpected or missing):
            logger.warning("checkpoint: key mismatch (%s): %s", mode, mismatch)
        if mode == "return_unexpected":
            missing = []
        return unexpected, missing


def damaged_error(storage: CheckpointStorage, step: int, problems: list[str],
                  others: list[int]) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {storage.step_url(step)} is damaged: {'; '.join(problems[:5])}. Nothing "
        f"was deleted. Load another committed step with --checkpoint.load_step N (committed: "
        f"{others or 'none'}), or move this one away")
