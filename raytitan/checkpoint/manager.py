"""CheckpointManager: what a training run saves, when, and what it resumes from.

Save: every rank writes its DCP shards straight into <root>/step-<N> through an fsspec
writer (sync, or staged and persisted in the background), then rank 0 commits the step
(COMMIT.json, last) and every rank calls `on_commit` (the Ray report). Load: choose the
newest committed step (or `load_step`, or `initial_load_path`), check it, and load the
requested keys, resharding onto this run's mesh. See docs/checkpointing.md.

Here: saving and the public API. Loading a step: loading.py; what a step holds and who owns
it: state.py; the Hugging Face export and initial load plug in through formats.py.

Contents (top-level keys; nested keys are FQN-based so they reshard):
    model         parameters by canonical FQN (DTensors, any mesh)
    optimizer     AdamW state, flattened per parameter FQN
    lr_scheduler  steps taken by the schedule
    train_state   step, tokens seen
    dataloader    the global data position (re-splits onto any DP degree)
    rng           rank<r>: that rank's torch / CUDA / Python RNG state
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from raytitan.checkpoint.collectives import on_every_rank, on_rank0
from raytitan.checkpoint.fast import FastTier
from raytitan.checkpoint.folder import OpenFolder, open_folder
from raytitan.checkpoint.formats import InitialLoad, StepExport
from raytitan.checkpoint.loading import LoadResult, StepLoader
from raytitan.checkpoint.planning import save_planner
from raytitan.checkpoint.retry import with_retries
from raytitan.checkpoint.shards import StepWriter
from raytitan.checkpoint.state import (
    Stateful,
    StepContents,
    count_non_finite,
    rng_state,
    set_rng_state,
)
from raytitan.checkpoint.storage import (
    INTERRUPTED,
    CheckpointError,
    CheckpointStorage,
    StepInfo,
    describe_error,
    disk_full_note,
    in_commit_order,
    latest_full,
    parse_storage_options,
    split_step_dir,
    step_name,
)
from raytitan.config.job_config import Checkpoint as CheckpointConfig

__all__ = ["TOKENIZER_FILES", "CheckpointManager", "InitialLoad", "LoadResult", "StepExport",
           "build_checkpoint_storage", "checkpoint_base", "rng_state", "set_rng_state"]

logger = logging.getLogger("raytitan")

# Tokenizer files copied into <step>/tokenizer/ when the dataset has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")


@dataclass
class _PendingSave:
    step: int
    model_only: bool
    dtype: str
    started: float
    stall: float
    begun: Future | None  # the background start: finite check, step dir, DCP's planning
    future: Future | None = None  # DCP's write (set once `begun` is joined)
    staging: Future | None = None  # DCP's copy of the state


class CheckpointManager:
    """Saves and loads one run's checkpoints. Every method is called on every rank.

    Args:
        cfg: the [checkpoint] section.
        storage: the run's checkpoint folder.
        model_parts: this rank's model parts (one, or its pipeline stages).
        optimizers: one optimizer per model part.
        states: the other top-level keys: lr_scheduler, train_state, dataloader.
        run_info: written into every commit manifest (world size, mesh, ...).
        files: returns the extra files rank 0 writes into each step {relative path: bytes}
            (run_config.toml, tokenizer assets); called once, on rank 0, at the first commit.
        on_commit: called on every rank with (step, step directory name) after a commit.
        retention: delete steps beyond keep_latest_k here (False when Ray does it).
        folder: the opened folder (open_folder); opened here (no Ray restart) if None.
        final_export: written into the final step before its commit (needed, and only
            used, with last_save_in_hf).
        initial_hf: reads initial_load_path into the model (needed, and only used, with
            initial_load_in_hf).
        dump_folder: the job's dump folder (a relative non_persistent_global_ckpt_dir).

    Raises:
        CheckpointError: last_save_in_hf without final_export, or initial_load_in_hf
            without initial_hf.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        *,
        storage: CheckpointStorage,
        model_parts: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        states: dict[str, Stateful],
        run_info: dict[str, Any] | None = None,
        files: Callable[[], dict[str, bytes]] | None = None,
        on_commit: Callable[[int, str], None] | None = None,
        retention: bool = True,
        folder: OpenFolder | None = None,
        final_export: StepExport | None = None,
        initial_hf: InitialLoad | None = None,
        dump_folder: str = ".",
    ) -> None:
        for option, given, name in (("last_save_in_hf", final_export, "final_export"),
                                    ("initial_load_in_hf", initial_hf, "initial_hf")):
            if getattr(cfg, option) and given is None:
                raise CheckpointError(f"checkpoint.{option} = true needs a CheckpointManager "
                                      f"built with {name} (the Trainer builds one)")
        self.cfg = cfg
        self.storage = storage
        self.model_parts = model_parts
        self.optimizers = optimizers
        self.states = states
        self.final_export = final_export if cfg.last_save_in_hf else None
        self.initial_hf = initial_hf if cfg.initial_load_in_hf else None
        self.run_info = run_info or {}
        self._files_source = files
        self._files_cache: dict[str, bytes] | None = None
        self.on_commit = on_commit
        self.retention = retention
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # NOTE: a background save runs collectives on `self.pg` while the training thread
        # polls on `self.ctrl`: one gloo group used from two threads deadlocks (PLATFORM.md).
        self.pg = dist.new_group(backend="gloo")
        self.ctrl = dist.new_group(backend="gloo")
        self.contents = StepContents(model_parts, optimizers, states, self.rank)
        self.loader = StepLoader(cfg, self.contents, pg=self.pg, ctrl=self.ctrl)
        self.folder = folder or open_folder(cfg, storage, job=self.run_info.get("job", "?"),
                                            group=self.ctrl)
        self._pending: _PendingSave | None = None
        self._starter: ThreadPoolExecutor | None = None  # begins async saves (_begin_save)
        self.last_committed: int | None = self.folder.choice.step
        """This folder's newest step committed by, or resumed by, this run."""
        # Staging buffers are allocated at the first save and reused by every later one
        # (safe: a save first waits for the previous persist to finish reading them).
        self._stager = None
        if cfg.async_mode != "disabled":
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            gpu = torch.cuda.is_available()
            pinned = cfg.async_mode == "async_with_pinned_mem"
            if pinned and not gpu:
                logger.info("checkpoint: no GPU, so async_with_pinned_mem stages into reused "
                            "shared (not pinned) CPU memory")
            # Both copy in a background thread (overlapping the next forward/backward);
            # async_with_pinned_mem into memory its persist process shares.
            self._stager = DefaultStager(StagingOptions(
                use_pinned_memory=gpu, use_shared_memory=pinned, use_async_staging=True,
                use_non_blocking_copy=gpu))
        self.last_stall_sec = 0.0
        self.last_save_sec = 0.0
        self.last_save_time = time.monotonic()
        self.fast: FastTier | None = None
        if cfg.fast_tier and not cfg.load_only:
            self.fast = FastTier(cfg, self.contents, lineage=self.folder.lineage,
                                 run_info=self.run_info, job=self.run_info.get("job", "job"),
                                 dump_folder=dump_folder,
                                 background=cfg.async_mode != "disabled")

    # -- collective helpers -------------------------------------------------------------

    def _on_rank0(self, fn: Callable[[], Any]) -> Any:
        return on_rank0(fn, self.ctrl)

    def _on_every_rank(self, fn: Callable[[], Any], what: str) -> list[Any]:
        return on_every_rank(fn, what, self.ctrl)

    # -- saving -------------------------------------------------------------------------

    def should_save(self, step: int, last_step: int) -> bool:
        return self.save_due(step, last_step) == "persistent"

    def save_due(self, step: int, last_step: int) -> str | None:
        """Collective when a time-based interval is set. "persistent", "fast" or None: the
        tier `step` is saved to (a persistent save makes a fast one that step redundant)."""
        cfg = self.cfg
        if cfg.load_only:
            return None
        timed = [False, False]
        if cfg.interval_seconds or cfg.non_persistent_interval_seconds:
            # Every rank must agree: rank 0's clock decides.
            now = time.monotonic()
            flags = torch.tensor([
                int(bool(cfg.interval_seconds)
                    and now - self.last_save_time >= cfg.interval_seconds),
                int(self.fast is not None and bool(cfg.non_persistent_interval_seconds)
                    and now - self.fast.last_save_time >= cfg.non_persistent_interval_seconds)])
            dist.broadcast(flags, src=0, group=self.ctrl)
            timed = [bool(flags[0]), bool(flags[1])]
        if step % cfg.interval == 0 or step == last_step or timed[0]:
            return "persistent"
        if self.fast is not None and (timed[1] or (
                cfg.non_persistent_save_interval
                and step % cfg.non_persistent_save_interval == 0)):
            return "fast"
        return None

    def save_fast(self, step: int) -> None:
        """Save `step` to the fast tier (docs/checkpointing.md "Tiers"); its copy checks
        the weights are finite (a step with NaN/inf weights is not kept)."""
        self.fast.save(step)
        self.last_stall_sec = self.fast.last_stall_sec

    def save(self, step: int, *, final: bool = False, model_only: bool = False) -> None:
        """Save `step`. Asynchronous per async_mode unless `final`; at most one save is in
        flight (a new one first waits for the previous one to commit)."""
        # The final export (last_save_model_only) is cast to export_dtype; an explicitly
        # model-only save (the seed checkpoint) keeps the model's own dtype.
        export = final and self.cfg.last_save_model_only and not model_only
        model_only = model_only or export
        self.poll(wait=True)
        start = time.perf_counter()
        self.last_save_time = time.monotonic()
        dtype = self.cfg.export_dtype if export else "float32"
        # The state dicts are built here: during a forward FSDP2 swaps the modules'
        # parameters for unsharded ones, so a background thread could not build them.
        state = self._state_for_save(model_only, dtype)
        weights = self._local_weights()
        writer = StepWriter(self.storage.step_url(step),
                            storage_options=self.storage.options,
                            checksums=self.cfg.save_checksums,
                            thread_count=self.cfg.thread_count,
                            retry_sec=self.cfg.storage_retry_seconds)
        planner = save_planner(
            balanced=self.cfg.fully_parallel_save,
            cache_kind=f"{'model' if model_only else 'full'}-{dtype}"
            if self.cfg.ckpt_assume_constant_structure else None)
        if final or self.cfg.async_mode == "disabled":
            self._check_finite(step, weights)
            self._on_rank0(lambda: self._prepare(step))
            try:
                dcp.save(state, storage_writer=writer, planner=planner, process_group=self.pg)
            except (Exception, CheckpointException) as e:
                raise self._save_error(step, e) from e
            written, export_error = None, None
            if final and self.final_export is not None:
                try:
                    written = self._export(step, self.final_export)
                except CheckpointError as e:  # every rank: keep the step, drop its hf/
                    export_error = e
                    self._on_rank0(lambda: self._remove_export(step))
            self.last_stall_sec = self.last_save_sec = time.perf_counter() - start
            self._commit(step, model_only, dtype, self.last_save_sec, written)
            if export_error is not None:
                raise CheckpointError(
                    f"{export_error}. {self.storage.step_url(step)} is committed without "
                    f"it; export it with `raytitan convert to-hf "
                    f"{self.storage.step_url(step)} OUT`") from export_error
            return
        if torch.cuda.is_available():
            # NOTE: the copy runs on its own CUDA stream, which does not wait for the
            # queued optimizer step: without this it can read half-updated weights.
            torch.cuda.current_stream().synchronize()
        if self._starter is None:
            self._starter = ThreadPoolExecutor(1, thread_name_prefix="ckpt-begin")
        begun = self._starter.submit(self._begin_save, step, state, weights, writer, planner)
        self._pending = _PendingSave(step, model_only, dtype, start,
                                     time.perf_counter() - start, begun)

    def _begin_save(self, step: int, state: dict[str, Any], weights: list[torch.Tensor],
                    writer: StepWriter, planner) -> Any:
        """The start of an async save, in a background thread (overlapping the next forward
        and backward, which leave the sharded weights alone): the finite check, the step
        directory, DCP's planning; then DCP stages into reused buffers in a thread, and a
        thread (async) or a separate process (async_with_pinned_mem) writes the copy.
        NOTE: only `self.pg` here; the training thread keeps `self.ctrl`."""
        self._check_finite(step, weights, group=self.pg)
        on_rank0(lambda: self._prepare(step), self.pg)
        return dcp.async_save(
            state, storage_writer=writer, planner=planner, process_group=self.pg,
            async_stager=self._stager,
            async_checkpointer_type=AsyncCheckpointerType.THREAD
            if self.cfg.async_mode == "async" else AsyncCheckpointerType.PROCESS)

    def _joined(self, pending: _PendingSave) -> None:
        """Wait for the background start of `pending`; a failed start fails the save."""
        if pending.begun is not None:
            begun, pending.begun = pending.begun, None
            try:
                response = begun.result()
                pending.future = response.upload_completion
                pending.staging = response.staging_completion
            except (Exception, CheckpointException) as e:  # the same on every rank
                pending.future = Future()
                pending.future.set_exception(e)

    def wait_for_staging(self) -> None:
        """Block until the in-flight save has copied the state; call before the optimizer
        changes it."""
        if self.fast is not None:
            self.fast.wait_for_staging()
        pending = self._pending
        if pending is not None and (pending.begun is not None or pending.staging is not None):
            start = time.perf_counter()
            self._joined(pending)
            if pending.staging is not None:
                try:
                    pending.staging.result()
                except (Exception, CheckpointException):
                    pass  # the upload fails too; poll() raises it on every rank
            pending.stall += time.perf_counter() - start
            pending.staging = None

    def poll(self, *, wait: bool = False) -> None:
        """Commit the in-flight save if every rank has persisted it (`wait`: wait for that).
        A failed background save raises here."""
        if self.fast is not None:
            self.fast.wait() if wait else self.fast.poll()
        pending = self._pending
        if pending is None:
            return
        if wait or (pending.begun is not None and pending.begun.done()):
            self._joined(pending)
        if wait:
            try:
                pending.future.result()
            except (Exception, CheckpointException):
                pass  # raised on every rank below
        done = pending.future is not None and pending.future.done()
        failed = done and pending.future.exception() is not None
        flags = torch.tensor([int(done), int(failed)])
        dist.all_reduce(flags, group=self.ctrl)
        if int(flags[0]) < self.world_size and not int(flags[1]):
            return
        self._pending = None
        if int(flags[1]):
            error = pending.future.exception()
            raise self._save_error(pending.step, error, ranks=int(flags[1])) from error
        self.last_stall_sec = pending.stall
        self.last_save_sec = time.perf_counter() - pending.started
        self._commit(pending.step, pending.model_only, pending.dtype, self.last_save_sec)

    def close(self) -> None:
        """Finish an in-flight save, release staging buffers and the folder's lease."""
        try:
            self.poll(wait=True)
        finally:
            if self.fast is not None:
                self.fast.close()
            if self._starter is not None:
                self._starter.shutdown()
                self._starter = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if self.folder.lease is not None:
                self.folder.lease.release()

    def _save_error(self, step: int, error: BaseException | None, ranks: int = 0
                    ) -> CheckpointError:
        """What failed, where, why (errno names, a full disk) and what is still safe."""
        newest = None
        if self.rank == 0:
            try:
                newest = latest_full(self.storage.list_steps(), self.folder.lineage)
            except Exception as e:  # the storage may be what failed
                logger.warning("checkpoint: could not list %s: %s", self.storage.url,
                               describe_error(e))
        where = self.storage.step_url(step)
        cause = describe_error(error) if error is not None else "unknown error"
        note = disk_full_note(self.storage.root) if self.storage.is_local else ""
        return CheckpointError(
            f"{'background ' if ranks else ''}save of {where} failed"
            f"{f' on {ranks} rank(s)' if ranks else ''}: {cause}.{note} It is not committed; "
            f"the last committed step is "
            f"{self.storage.step_url(newest.step) if newest else '(on rank 0) unchanged'}")

    def _retrying(self, fn: Callable[[], Any], what: str) -> Any:
        return with_retries(fn, what, self.cfg.storage_retry_seconds)

    def _local_weights(self) -> list[torch.Tensor]:
        """This rank's shards of the model's parameters."""
        from torch.distributed.tensor import DTensor

        return [p.to_local() if isinstance(p, DTensor) else p
                for part in self.model_parts for p in part.parameters()]

    def _check_finite(self, step: int, weights: list[torch.Tensor], group=None) -> None:
        """Never commit NaN/inf weights: every rank checks its shards (`weights`), all
        raise alike."""
        flags = torch.tensor([count_non_finite(weights)])
        dist.all_reduce(flags, group=self.ctrl if group is None else group)
        if int(flags[0]):
            raise CheckpointError(
                f"step {step}: the model holds non-finite (NaN/inf) weights ({int(flags[0])} "
                f"tensors over all ranks), so it is not saved; the committed steps of "
                f"{self.storage.url} are untouched (lower training.lr, or resume from one)")

    def _prepare(self, step: int) -> None:
        self._retrying(lambda: self._prepare_step_dir(step),
                       f"preparing {self.storage.step_url(step)}")

    def _prepare_step_dir(self, step: int) -> None:
        """Make way for a save of `step` and record the intent (SAVING.json). This run's
        own interrupted save of it is deleted; anything else there (a committed step of an
        abandoned line, another run's step, a damaged directory) is moved to quarantine/,
        never deleted."""
        self._check_lease()
        if self.storage.step_exists(step):
            info = self.storage.step_info(step)
            if info.state == INTERRUPTED and info.lineage == self.folder.lineage:
                self.storage.remove_step(step)
            else:
                dest = self.storage.quarantine(step)
                logger.warning("checkpoint: %s was in the way of this save (%s%s): moved to %s",
                               self.storage.step_url(step), info.state,
                               f": {info.problem}" if info.problem else "", dest)
        self.storage.write_intent(step, {"lineage": self.folder.lineage,
                                         "holder": self.folder.lease.holder
                                         if self.folder.lease else None})

    def _check_lease(self) -> None:
        """Rank 0: raise if another run took the folder (then this run stops saving)."""
        if self.folder.lease is not None:
            self.folder.lease.check()

    def _state_for_save(self, model_only: bool, dtype_name: str) -> dict[str, Any]:
        model = self.contents.merged_state("model")
        if dtype_name != "float32":
            dtype = getattr(torch, dtype_name)
            model = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.items()}
        state: dict[str, Any] = {"model": model}
        if model_only:
            return state
        if self.cfg.save_optim:
            state["optimizer"] = self.contents.merged_state("optimizer")
        for key, obj in self.states.items():
            state[key] = obj.state_dict()
        if self.cfg.save_rng:
            state["rng"] = {f"rank{self.rank}": rng_state()}
        return state

    def _commit(self, step: int, model_only: bool, dtype: str, seconds: float,
                written: dict[str, dict] | None = None) -> None:
        """Rank 0 writes the extra files and COMMIT.json (last); then every rank reports.
        `written`: files the ranks wrote besides DCP's ({name: {size, crc32}})."""
        def commit() -> int:
            keys = ["model"] if model_only else ["model", *(["optimizer"] if self.cfg.save_optim
                                                            else []), *self.states,
                                                 *(["rng"] if self.cfg.save_rng else [])]
            fields = {"model_only": model_only, "dtype": dtype, "keys": keys,
                      "world_size": self.world_size, **self.run_info,
                      "lineage": self.folder.lineage}
            self._check_lease()
            if written:  # the HF export's files
                fields[self.final_export.dirname] = self.final_export.dirname
            manifest, steps = self._retrying(lambda: self.storage.commit_step(
                step, fields, files=self._files(), written=written,
                checksums=self.cfg.save_checksums), f"committing {self.storage.step_url(step)}")
            self._clean(steps, retain=True)
            return sum(entry["size"] for entry in manifest["files"].values())

        total = self._on_rank0(commit)
        self.last_committed = step
        logger.info("checkpoint: committed %s (%.1f MB) in %.2f s (%.0f MB/s; training "
                    "blocked %.3f s)", self.storage.step_url(step), total / 1e6, seconds,
                    total / 1e6 / max(seconds, 1e-9), self.last_stall_sec)
        if self.on_commit is not None:
            # A model-only export is an artifact, not a point to resume from: Ray is told the
            # metrics only, so its retention and get_checkpoint() see full-state steps alone.
            self.on_commit(step, None if model_only else step_name(step))

    def _export(self, step: int, export: StepExport) -> dict[str, dict]:
        """Write <step>/<dirname> (hf), a Hugging Face folder of the step just saved, in
        export_dtype: every rank writes its share of the safetensors files (read back from
        the step, so any mesh works), then rank 0 the config, tokenizer and index. Returns
        the files, by their name in the step."""
        url, hf_dir = self.storage.step_url(step), export.dirname
        what, start = f"HF export of {url}", time.perf_counter()

        def share() -> dict[str, dict]:
            return {f"{hf_dir}/{name}": entry for name, entry in
                    export.write_shards(url, self.rank, self.world_size).items()}

        def rest() -> dict[str, dict]:
            tokenizer = {name.removeprefix("tokenizer/"): data
                         for name, data in self._files().items()
                         if name.startswith("tokenizer/")}
            return {f"{hf_dir}/{name}": entry
                    for name, entry in export.write_rest(url, tokenizer).items()}

        written = {name: entry for files in self._on_every_rank(share, what)
                   for name, entry in files.items()}
        try:
            written.update(self._on_rank0(rest))
        except CheckpointError as e:
            raise CheckpointError(f"{what} failed: {e}") from e
        logger.info("checkpoint: exported %s/%s (Hugging Face, %s, %d files) in %.2f s", url,
                    hf_dir, self.cfg.export_dtype, len(written), time.perf_counter() - start)
        return written

    def _remove_export(self, step: int) -> None:
        path = self.storage.step_path(step, self.final_export.dirname)
        if self.storage.fs.exists(path):
            self.storage.fs.rm(path, recursive=True)

    def _clean(self, steps: list[StepInfo], *, retain: bool) -> None:
        """Rank 0, after a commit, given the folder's `steps`: delete this run's oldest
        commits beyond keep_latest_k, never the newest one nor the newest full-state one (a
        model-only export cannot be resumed from), never another run's."""
        k = self.cfg.keep_latest_k
        if not (retain and self.retention and k > 0):
            return
        lineage = self.folder.lineage
        newest_full = latest_full(steps, lineage)
        for info in in_commit_order(steps, lineage)[:-k]:
            if newest_full is None or info.step != newest_full.step:
                logger.info("checkpoint: removing %s (keep_latest_k = %d)",
                            step_name(info.step), k)
                self.storage.remove_step(info.step)

    def _files(self) -> dict[str, bytes]:
        if self._files_cache is None:
            self._files_cache = self._files_source() if self._files_source else {}
        return self._files_cache

    # -- loading ------------------------------------------------------------------------

    def load(self) -> LoadResult | None:
        """Load what this run should start from, or return None for a fresh start.

        Precedence: the step chosen when the folder was opened (`load_step`, else the most
        recently committed full-state step of this run, else a model-only step-0 seed; after
        a Ray restart the newest step); else `initial_load_path`; else nothing (an error with
        exit_on_missing_checkpoint, or when the folder holds directories that may be this
        run's progress but cannot be loaded).
        """
        url, step, commit, model_only, others = self._on_rank0(self._choose)
        if self.fast is not None:
            if (result := self._load_fast(step if commit is not None else None)) is not None:
                return result
        if url is None:
            return None
        if commit is None:  # a Hugging Face folder (initial_load_in_hf)
            return self._load_hf(url)
        storage = (self.storage if url == self.storage.url
                   else CheckpointStorage(url, self.storage.options))
        return self.loader.load(storage, step, commit, model_only, others)

    def _load_fast(self, persistent_step: int | None) -> LoadResult | None:
        """Resume from the fast tier if it holds a newer complete step for this mesh."""
        fast = self.fast
        if self.cfg.load_step >= 0:  # an explicit persistent step
            fast.cleanup_after_choice(None)
            return None
        choice = fast.choose(persistent_step)
        fast.cleanup_after_choice(choice.step if choice else None)
        if choice is None:
            return None
        start = time.perf_counter()
        cfg = self.cfg
        request: dict[str, Any] = {}
        part_keys: dict[str, list[list[str]]] = {}
        for group in ("model", "optimizer"):
            parts = self.contents.part_states(group)
            part_keys[group] = [list(part) for part in parts]
            request[group] = {k: v for part in parts for k, v in part.items()}
        for key, obj in self.states.items():
            request[key] = dict(obj.state_dict())
        request["rng"] = {f"rank{self.rank}": rng_state()}
        skip = set(cfg.exclude_from_loading) | ({"optimizer"} if not cfg.load_optim else set()) \
            | ({"rng"} if not cfg.load_rng else set())
        for key in skip:
            request.pop(key, None)
            part_keys.pop(key, None)
        sources = fast.load(choice, request)
        self.contents.apply(request, part_keys)
        seconds = time.perf_counter() - start
        if self.rank == 0:
            replicas = {r: s for r, s in sources.items() if s != "own node"}
            logger.info("checkpoint: resumed from the FAST TIER, step %d of %s in %.2f s: "
                        "%s; nothing read from persistent storage%s", choice.step, fast.dir,
                        seconds, "every rank from its own node" if not replicas else
                        f"ranks {sorted(replicas)} from peer replicas ("
                        + "; ".join(f"rank {r}: {s}" for r, s in sorted(replicas.items())) + ")",
                        f" (its newest step is {persistent_step})"
                        if persistent_step is not None else "")
        return LoadResult(choice.step, f"fast tier {fast.dir}/step-{choice.step}",
                          sorted(request), [], [])

    def _choose(self):
        cfg, choice, where = self.cfg, self.folder.choice, self.storage.url
        if choice.step is not None:
            if cfg.initial_load_path:
                logger.warning("checkpoint: %s holds committed %s, so the run RESUMES from it "
                               "and checkpoint.initial_load_path = %s is IGNORED",
                               where, step_name(choice.step), cfg.initial_load_path)
            return (where, choice.step, choice.commit, bool(choice.commit.get("model_only")),
                    choice.others)
        if choice.blocking:
            raise CheckpointError(
                f"{where} holds step directories that are not committed and are not this "
                f"run's interrupted saves: {'; '.join(choice.blocking)}. Refusing to start "
                f"from scratch over them: inspect them (`raytitan ckpt ls {where}`), then "
                "repair, move away or delete them, or use another job.name")
        if cfg.initial_load_path and self.initial_hf is not None:  # initial_load_in_hf
            try:
                self.initial_hf.check(cfg.initial_load_path)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"checkpoint.initial_load_in_hf: {e}") from e
            logger.info("checkpoint: no checkpoint in %s; starting from the Hugging Face "
                        "weights in %s", where, cfg.initial_load_path)
            return cfg.initial_load_path, 0, None, True, []
        if cfg.initial_load_path:
            commit = None
            try:
                parent, initial_step = split_step_dir(cfg.initial_load_path)
                initial = CheckpointStorage(parent, self.storage.options)
                commit = initial.read_commit(initial_step)
            except ValueError:
                pass
            if commit is None:
                raise CheckpointError(
                    f"checkpoint.initial_load_path = {cfg.initial_load_path} is not a committed "
                    "raytitan step directory (<folder>/step-<N> with a COMMIT.json)")
            logger.info("checkpoint: no checkpoint in %s; starting from "
                        "initial_load_path %s%s", where, cfg.initial_load_path,
                        " (model only)" if cfg.initial_load_model_only else "")
            return initial.url, commit["step"], commit, cfg.initial_load_model_only, []
        if cfg.exit_on_missing_checkpoint:
            raise CheckpointError(
                f"no committed checkpoint in {where} and no initial_load_path, and "
                "checkpoint.exit_on_missing_checkpoint = true")
        logger.info("checkpoint: no checkpoint in %s; starting from scratch", where)
        return None, None, None, None, []

    def _load_hf(self, folder: str) -> LoadResult:
        """Fill this rank's model parts from an HF folder (checked by `_choose`)."""
        start = time.perf_counter()
        self._on_every_rank(lambda: self.initial_hf.fill(folder, self.model_parts),
                            f"loading Hugging Face weights from {folder}")
        logger.info("checkpoint: loaded the model from Hugging Face folder %s in %.2f s",
                    folder, time.perf_counter() - start)
        return LoadResult(0, folder, ["model"], [], [])


def build_checkpoint_storage(cfg: CheckpointConfig, dump_folder: str, run_name: str
                             ) -> CheckpointStorage:
    """<folder>/<run_name>, the folder taken relative to the dump folder unless absolute or
    a URL. Under Ray this is the Ray run directory (storage_path=<folder>, name=run_name)."""
    return CheckpointStorage(f"{checkpoint_base(cfg, dump_folder)}/{run_name}",
                             parse_storage_options(cfg.storage_options))


def checkpoint_base(cfg: CheckpointConfig, dump_folder: str) -> str:
    folder = cfg.folder
    if "://" in folder or os.path.isabs(folder):
        return folder.rstrip("/")
    return os.path.abspath(os.path.join(dump_folder, folder))


