"""The per-worker training program. It never imports Ray: the launcher hands it a shard
reader (Ray Data) and a report callback; under torchrun it reads shards with pyarrow.

    torchrun --nproc-per-node 2 -m raytitan.train --config jobs/debug.toml [--section.key v]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raytitan import restart
from raytitan.checkpoint import CheckpointError, CheckpointManager, build_checkpoint_storage
from raytitan.checkpoint.folder import check_folder_hosts, open_folder
from raytitan.checkpoint.manager import TOKENIZER_FILES
from raytitan.config import ConfigError, JobConfig, load_job_config, redacted, to_toml
from raytitan.data import resolve_dataset
from raytitan.data.prepare import Manifest, prepare_local
from raytitan.data.stream import ReadShards, TokenStream, read_shards_local
from raytitan.data.tokenizer import tokenizer_hash
from raytitan.interop.hf import HFInitialLoad, HFStepExport
from raytitan.metrics import MetricsLogger, init_logging, memory_gib, peak_flops
from raytitan.models.llama3 import Llama3
from raytitan.models.llama3.parallelize import parallelize_llama3
from raytitan.models.llama3.pipeline import build_pipeline_schedule, split_into_stages
from raytitan.parallel.utils import clip_grad_norm_, fill_param
from raytitan.plan import build_plan
from raytitan.resume import check_resume_config

logger = logging.getLogger("raytitan")

# Called with (metrics, checkpoint_dir or None) on every rank; the launcher's sends to Ray.
ReportFn = Callable[[dict, "str | None"], None]


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm is NaN or infinite (training.on_nonfinite = stop)."""


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy, computed in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def lr_at(step: int, cfg) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up, then decay to
    lr * min_lr_ratio. A pure function of the step, so it needs no checkpoint state."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
    factor = {
        "linear": 1.0 - progress,
        "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
        "sqrt": 1.0 - math.sqrt(progress),
    }[cfg.decay_type]
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)


class LRSchedule:
    """Counts the schedule's steps; its state is what `exclude_from_loading = lr_scheduler`
    drops (the schedule then restarts from warm-up)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.steps = 0

    def step(self) -> float:
        """Advance one optimizer step and return its learning rate."""
        self.steps += 1
        return lr_at(self.steps, self.cfg)

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])


def _check_hf_tokenizer(folder: str, manifest: Manifest) -> None:
    """Warn when the corpus was tokenized with another tokenizer than the HF model's."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        if tokenizer_hash(f.read()) != manifest.tokenizer_sha256:
            logger.warning("the dataset %s was tokenized with another tokenizer than %s: "
                           "the pretrained embeddings will not fit it (prepare it with "
                           "`raytitan prepare --tokenizer %s`)", manifest.root, path, folder)


def init_distributed() -> torch.device:
    """Join the process group torchrun describes (env://) unless Ray's TorchTrainer already
    did, and return this process's device: CUDA iff the group runs NCCL (under Ray that is
    `ray.use_gpu`), so the model never lands on a GPU behind a gloo group or vice versa."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # NOTE: torchrun's agent keeps one store across worker restarts, and every attempt
            # uses the same keys: a restarted rank can read a dead rank's address and fail to
            # connect. Each attempt gets its own key prefix.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  is_master=False)
            dist.init_process_group(backend, store=dist.PrefixStore(restart.store_prefix(), store),
                                    rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
        else:
            dist.init_process_group(backend)
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    # Ray may show each worker all GPUs of its node or only its own: modulo covers both.
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


class Trainer:
    def __init__(
        self,
        cfg: JobConfig,
        *,
        read_shards: ReadShards = read_shards_local,
        report: ReportFn | None = None,
        reported_checkpoint: str | None = None,
        external_retention: bool = False,
        preemption: Callable[[], bool] | None = None,
        exit_on_preemption: bool = True,
    ) -> None:
        """Args:
            cfg: the validated job config.
            read_shards: how the data stream reads shards (pyarrow here, Ray Data under Ray).
            report: called on every rank with (metrics, committed step dir name or None).
            reported_checkpoint: the step dir name of Ray's latest registered checkpoint.
            external_retention: the launcher (Ray) deletes old checkpoints, not us.
            preemption: called every step on every rank (all ranks must get the same
                answer): True once this run is about to lose a node (SIGTERM under torchrun,
                Ray's preemption notice). Then the step is saved to the fastest tier that
                survives the node (a peer replica, else persistent storage).
            exit_on_preemption: stop after that save (torchrun), or keep training until the
                node goes (Ray restarts the run from the save).
        """
        self.cfg = cfg
        self.report = report
        self.preemption = preemption
        self.exit_on_preemption = exit_on_preemption
        self.preempted_at: int | None = None
        """The step saved on a preemption notice, if one came."""
        t = cfg.training
        self.device = init_distributed()
        self.rank, world_size = dist.get_rank(), dist.get_world_size()
        init_logging(self.rank)
        if cfg.job.description:
            logger.info("job %s: %s", cfg.job.name, cfg.job.description)
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(t.num_threads or max(1, (os.cpu_count() or 1) // local_procs))
        # The process RNGs (torch CPU + CUDA, python) start from the seed as well, one stream
        # per rank, so runs with one seed hold the same RNG state at every step (weight init
        # and the data order draw from their own generators).
        rank_seed = t.seed * 1_000_003 + self.rank
        torch.manual_seed(rank_seed)
        random.seed(rank_seed)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)

        # Data first: the debug model takes its vocabulary size from the tokenizer.
        if self.rank == 0:
            dataset = resolve_dataset(cfg.data, prepare_local)
        dataset_box = [dataset if self.rank == 0 else None]
        dist.broadcast_object_list(dataset_box, src=0)
        manifest = Manifest.load(dataset_box[0])

        ckpt = cfg.checkpoint
        if ckpt.create_seed_checkpoint and (world_size != 1 or not ckpt.enable):
            raise ConfigError(
                "checkpoint.create_seed_checkpoint builds the model in one process: it needs "
                f"checkpoint.enable = true and a world size of 1 (got enable = {ckpt.enable}, "
                f"world size {world_size})")
        hosts: list[str] = [""] * world_size
        dist.all_gather_object(hosts, socket.gethostname())
        self.storage = self.folder = None
        if ckpt.enable:
            # Before anything is built: a storage problem, another run in the folder or a
            # config that cannot resume fails now, and nothing is written until it is clear.
            self.storage = build_checkpoint_storage(ckpt, cfg.job.dump_folder, cfg.job.name)
            check_folder_hosts(self.storage, hosts, shared=ckpt.shared_filesystem)
            reported = (int(reported_checkpoint.rsplit("-", 1)[1])
                        if reported_checkpoint else None)
            self.folder = open_folder(ckpt, self.storage, job=cfg.job.name,
                                      reported_step=reported)
            choice = self.folder.choice
            if choice.step is not None and not ckpt.create_seed_checkpoint:
                cfg = self.cfg = check_resume_config(
                    cfg, saved=self.folder.saved_config, commit=choice.commit,
                    world_size=world_size,
                    model_loaded="model" not in ckpt.exclude_from_loading,
                    verbose=self.rank == 0)

        self.plan = build_plan(cfg, world_size, vocab_size=manifest.vocab_size)
        if manifest.vocab_size > self.plan.model_args.vocab_size:
            raise ValueError(
                f"tokenizer of {manifest.root} has {manifest.vocab_size} tokens, more than "
                f"model.vocab_size {self.plan.model_args.vocab_size}"
            )
        dims = self.plan.parallel_dims
        self.mesh = dims.build_mesh(self.device.type)
        logger.info("%s", self.plan.describe())
        if dims.tp > 1:
            _check_tp_within_nodes(self.mesh["tp"], hosts)
        self.stream = TokenStream(
            manifest,
            seq_len=t.seq_len,
            seed=t.seed,
            dp_rank=dims.dp_mesh.get_local_rank(),
            dp_degree=dims.dp,
            global_batch_size=self.plan.global_batch_size,
            read_shards=read_shards,
        )
        if self.storage is None or ckpt.create_seed_checkpoint:
            self.stream.start()  # nothing to resume: the first shard loads during the build
        self._build_model()
        self.params = [p for m in self.model_parts for p in m.parameters()]
        # One optimizer per model part, so each part's state dict has that part's FQNs.
        self.optimizers = [
            torch.optim.AdamW(part.parameters(), lr=lr_at(1, t), betas=(t.beta1, t.beta2),
                              eps=t.eps, weight_decay=t.weight_decay, foreach=True)
            for part in self.model_parts
        ]
        self.lr_schedule = LRSchedule(t)
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self._last_metrics: dict = {}
        self.checkpointer = None
        if self.storage is not None:
            if ckpt.initial_load_in_hf:
                ckpt = dataclasses.replace(
                    ckpt, initial_load_path=ckpt.initial_load_path or cfg.model.hf_assets_path)
                if self.rank == 0:
                    _check_hf_tokenizer(ckpt.initial_load_path, manifest)
            # Hugging Face interop plugs into the checkpoint package from outside it.
            final_export = (HFStepExport(cfg.model.flavor, ckpt.export_dtype,
                                         self.storage.options)
                            if ckpt.last_save_in_hf else None)
            initial_hf = (HFInitialLoad(self.plan.model_args, cfg.model.flavor)
                          if ckpt.initial_load_in_hf else None)
            self.checkpointer = CheckpointManager(
                ckpt,
                storage=self.storage,
                model_parts=self.model_parts,
                optimizers=self.optimizers,
                states={"lr_scheduler": self.lr_schedule, "train_state": self,
                        "dataloader": self.stream},
                run_info={"mesh": dims.mesh_shape(), "job": cfg.job.name,
                          "flavor": cfg.model.flavor,
                          "global_batch_size": self.plan.global_batch_size},
                files=lambda: self._checkpoint_files(manifest),
                on_commit=self._on_commit,
                retention=not external_retention,
                folder=self.folder,
                final_export=final_export,
                initial_hf=initial_hf,
                dump_folder=cfg.job.dump_folder,
            )
        self.loaded = None
        """What the run resumed from (a LoadResult), or None for a fresh start."""
        if self.checkpointer is not None and not ckpt.create_seed_checkpoint:
            self.loaded = self.checkpointer.load()  # sets step, stream position, ...
            if self.loaded is not None:
                self._report_loaded(self.loaded)
            self.stream.start()
        self._init_weights(self.loaded)
        self.metrics = MetricsLogger(cfg.metrics, cfg.job.dump_folder, cfg.job.name,
                                     enabled=self.rank == 0, resume_step=self.step)
        self.peak_flops = peak_flops(cfg.metrics, self.device)

    def _init_weights(self, loaded) -> None:
        """Initialize the weights that `loaded` did not fill: all of them on a fresh start,
        none after a full resume (a restart then spends no time on random init), the
        checkpoint's absent keys after a partial load (dist_ckpt_strictness)."""
        names = None
        if loaded is not None and "model" in loaded.keys:
            names = {key.partition(".")[2] for key in loaded.unexpected
                     if key.startswith("model.")}
        for part in self.model_parts:
            part.init_weights(self.cfg.training.seed, fill=fill_param,
                              buffer_device=self.device, params=names)

    # -- checkpoint hooks ---------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """The train_state of a checkpoint."""
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])

    def _checkpoint_files(self, manifest: Manifest) -> dict[str, bytes]:
        """run_config.toml (secrets redacted) and the tokenizer assets, for every step."""
        files = {"run_config.toml": to_toml(redacted(self.cfg)).encode()}
        if self.cfg.checkpoint.save_tokenizer_assets:
            import fsspec

            fs, root = fsspec.core.url_to_fs(manifest.root)
            for name in TOKENIZER_FILES:
                if fs.exists(f"{root}/{name}"):
                    files[f"tokenizer/{name}"] = fs.cat_file(f"{root}/{name}")
        return files

    def _report_loaded(self, loaded) -> None:
        logger.info("resumed from %s: step %d, %s loaded", loaded.path, self.step,
                    ", ".join(loaded.keys))
        if loaded.unexpected or loaded.missing:  # dist_ckpt_strictness = log_* / return_*
            logger.warning("checkpoint: %d key(s) this run has are absent from %s and keep "
                           "their initial values (e.g. %s); %d key(s) of it were not loaded "
                           "(e.g. %s)", len(loaded.unexpected), loaded.path,
                           loaded.unexpected[:3], len(loaded.missing), loaded.missing[:3])

    def _on_commit(self, step: int, name: str) -> None:
        if self.report is not None:
            self.report({**self._last_metrics, "step": step}, name)

    def create_seed_checkpoint(self) -> None:
        """Save the freshly initialized model as a model-only step-0."""
        self.checkpointer.save(0, final=True, model_only=True)
        logger.info("seed checkpoint written to %s", self.storage.step_url(0))

    def _build_model(self) -> None:
        """Meta-device model -> pipeline stages -> parallelize -> allocate (the weights are
        initialized or loaded later: `_init_weights`)."""
        cfg, dims = self.cfg, self.plan.parallel_dims
        with torch.device("meta"):
            model = Llama3(self.plan.model_args)
        if dims.pp_enabled:
            stages = split_into_stages(model, self.mesh["pp"].get_local_rank(), dims.pp,
                                       cfg.parallelism.pipeline_parallel_schedule)
        else:
            stages = [(0, model)]
        self.model_parts = []
        for _, part in stages:
            parallelize_llama3(part, dims, training=cfg.training,
                               activation_checkpoint=cfg.activation_checkpoint,
                               compile_cfg=cfg.compile)
            part.to_empty(device=self.device)  # initialized after the load: _init_weights
            part.train()
            self.model_parts.append(part)
        self.pp_schedule = None
        if dims.pp_enabled:
            # Each microbatch loss is a 1/(accum * microbatches) share of the step's mean loss.
            scale = self.plan.grad_accum_steps * self.plan.pp_microbatches
            self.pp_schedule = build_pipeline_schedule(
                stages,
                schedule=cfg.parallelism.pipeline_parallel_schedule,
                pp_degree=dims.pp,
                pp_mesh=self.mesh["pp"],
                n_microbatches=self.plan.pp_microbatches,
                loss_fn=lambda logits, labels: cross_entropy(logits, labels) / scale,
                device=self.device,
            )
            self.pp_first = any(idx == 0 for idx, _ in stages)
            self.pp_last = any(part.output is not None for _, part in stages)
        # Without FSDP, mixed precision comes from autocast (FSDP casts parameters itself).
        dtype = getattr(torch, cfg.training.mixed_precision_param)
        self.autocast = (
            torch.autocast(self.device.type, dtype=dtype)
            if dtype != torch.float32 and not dims.dp_enabled else contextlib.nullcontext()
        )

    def train_step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's samples [n, seq_len + 1].
        Returns this rank's loss contribution and the global grad norm."""
        accum = self.plan.grad_accum_steps
        loss = torch.zeros((), device=self.device)
        if self.device.type == "cuda":
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        for micro in tokens.chunk(accum):
            inputs, labels = micro[:, :-1], micro[:, 1:]
            if self.pp_schedule is not None:
                losses: list[torch.Tensor] = []
                args = (inputs,) if self.pp_first else ()
                with self.autocast:
                    self.pp_schedule.step(*args, target=labels, losses=losses)
                if self.pp_last:  # each already scaled by 1 / (accum * microbatches)
                    loss += torch.stack(losses).sum().detach()
            else:
                with self.autocast:
                    micro_loss = cross_entropy(self.model_parts[0](inputs), labels) / accum
                micro_loss.backward()
                loss += micro_loss.detach()
        pp_mesh = self.mesh["pp"] if self.plan.parallel_dims.pp_enabled else None
        grad_norm = clip_grad_norm_(self.params, self.cfg.training.max_norm, pp_mesh)
        if self.checkpointer is not None:
            self.checkpointer.wait_for_staging()  # a background copy must not see this step
        # NOTE: "skip" needs the norm on the host every step (a device sync); "stop" checks
        # it at log steps, and every save checks the weights themselves.
        skip = (self.cfg.training.on_nonfinite == "skip"
                and not math.isfinite(grad_norm.item()))
        if skip:
            self.skipped_steps += 1
            logger.warning("step %d: gradient norm %s: optimizer step skipped (%d so far; "
                           "training.on_nonfinite = skip)", self.step, grad_norm.item(),
                           self.skipped_steps)
        for optimizer in self.optimizers:
            if not skip:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def global_loss(self, local_loss: torch.Tensor) -> float:
        """Mean loss over DP ranks. Every TP rank of the loss-holding stage has the same
        value and other pipeline stages hold 0, so sum over the world / (dp * tp)."""
        dims = self.plan.parallel_dims
        total = local_loss.detach().clone()
        dist.all_reduce(total)
        return total.item() / (dims.dp * dims.tp)

    def train(self) -> dict:
        """Run to training.steps; returns the last logged metrics."""
        cfg = self.cfg.training
        freq = self.cfg.metrics.log_freq
        last: dict = {}
        window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
        ckpt = self.checkpointer
        final_saved = False
        if self.step >= cfg.steps:
            logger.info("step %d of %d reached already: nothing to train", self.step, cfg.steps)
        else:
            logger.info("training steps %d..%d", self.step + 1, cfg.steps)
        while self.step < cfg.steps:
            self.step += 1
            lr = self.lr_schedule.step()
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            if ckpt is not None:
                ckpt.poll()  # commits (and reports) a background save once all ranks are done
            wait_start = time.perf_counter()
            batch = self.stream.next_batch()
            window_wait += time.perf_counter() - wait_start
            loss, grad_norm = self.train_step(batch.tokens)
            self.tokens_seen += self.plan.tokens_per_step
            window_steps += 1
            if self.step % freq == 0 or self.step in (1, cfg.steps):
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # time finished work, not queued kernels
                elapsed = time.perf_counter() - window_start
                last = self._log(loss, grad_norm, lr, elapsed, window_steps, window_wait)
                self._last_metrics = last
                window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
                if cfg.on_nonfinite == "stop" and not (math.isfinite(last["loss"])
                                                       and math.isfinite(last["grad_norm"])):
                    self._stop_nonfinite(last)
            due = ckpt.save_due(self.step, cfg.steps) if ckpt is not None else None
            if due == "persistent":
                final_saved = self.step == cfg.steps  # its commit reports the final metrics
                ckpt.save(self.step, final=final_saved)
            elif due == "fast":
                ckpt.save_fast(self.step)
            if (self.preemption is not None and self.preempted_at is None
                    and self.preemption()):
                self._emergency_save(due)
                if self.exit_on_preemption:
                    break
        if ckpt is not None:
            ckpt.close()
        self.stream.close()
        if self.report is not None and not final_saved:
            self.report(last, None)
        self.metrics.close()
        return last

    def _emergency_save(self, due: str | None) -> None:
        """The node is going away: make this step durable where it survives the node, now
        (the step just saved is waited for), so the resumed run repeats no step."""
        ckpt, step = self.checkpointer, self.step
        self.preempted_at = step
        if ckpt is None:
            logger.warning("step %d: preemption notice, but checkpoint.enable = false: "
                           "nothing to save", step)
            return
        start = time.perf_counter()
        if ckpt.fast is not None and ckpt.fast.survives_node_loss:
            if due != "fast":
                ckpt.save_fast(step)
            ckpt.fast.wait()
            where = f"the fast tier ({ckpt.fast.dir}, replicated on other nodes)"
        else:
            if due != "persistent":
                ckpt.save(step)
            ckpt.poll(wait=True)
            where = ckpt.storage.step_url(step)
        logger.warning("step %d: preemption notice: emergency save to %s in %.2f s%s", step,
                       where, time.perf_counter() - start,
                       "; stopping" if self.exit_on_preemption else "; training on until "
                       "the node goes")

    def _stop_nonfinite(self, last: dict) -> None:
        """Every rank sees the same global loss and norm, so every rank stops here."""
        ckpt = self.checkpointer
        if ckpt is not None:
            ckpt.close()  # an in-flight save of an earlier, finite step still commits
        newest = (self.storage.step_url(ckpt.last_committed) if ckpt and ckpt.last_committed
                  is not None else "none")
        raise NonFiniteError(
            f"step {self.step}: loss {last['loss']}, gradient norm {last['grad_norm']}: "
            f"training diverged, so it stops here and commits nothing more (last committed "
            f"step of this run: {newest}). Lower training.lr or resume from an earlier step; "
            "training.on_nonfinite = skip skips such steps instead")

    def _log(self, loss, grad_norm, lr, elapsed, steps, wait) -> dict:
        step_time = elapsed / steps
        tps = self.plan.tokens_per_step / step_time
        values = {
            "loss": self.global_loss(loss),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "tokens_per_sec": tps,
            "tokens_per_sec_per_device": tps / self.plan.parallel_dims.world_size,
            "step_time_sec": step_time,
            "data_wait_sec": wait / steps,
            "memory_gib": memory_gib(self.device),
            "tokens_seen": self.tokens_seen,
            "eta_sec": step_time * (self.cfg.training.steps - self.step),
        }
        if self.peak_flops:
            flops = self.plan.model_args.flops_per_token(self.plan.seq_len) * tps
            values["mfu"] = flops / (self.peak_flops * self.plan.parallel_dims.world_size)
        self.metrics.log(self.step, values)
        return {"step": self.step, **values}


def _check_tp_within_nodes(tp_mesh, hosts: list[str]) -> None:
    """Tensor parallel exchanges activations every layer: a TP group spread over nodes runs
    at network speed. Fail before training instead (every rank, the same error)."""
    ranks = dist.get_process_group_ranks(tp_mesh.get_group())
    groups: list = [None] * len(hosts)
    dist.all_gather_object(groups, ranks)
    spread = sorted({tuple(g) for g in groups if len({hosts[r] for r in g}) > 1})
    if spread:
        raise ConfigError(
            f"parallelism.tensor_parallel_degree = {len(ranks)}: tensor parallel groups "
            f"{[list(g) for g in spread[:3]]} span nodes "
            f"{sorted({hosts[r] for r in spread[0]})}; use a degree that divides the "
            "workers per node (Ray places a node's workers on consecutive ranks)")


def _exit_when_orphaned(poll_sec: float = 1.0) -> None:
    """Under torchrun: end this process when its agent dies (SIGKILL of the agent alone
    would leave the ranks training and committing, unsupervised)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_sec)
        logging.getLogger("raytitan").error("the torchrun agent (pid %d) is gone: this rank "
                                            "stops now", parent)
        os._exit(70)

    threading.Thread(target=watch, name="raytitan-orphan-watch", daemon=True).start()


def _sigterm_flag() -> Callable[[], bool]:
    """From the first step on, SIGTERM (torchrun forwards it to every rank before it kills
    them) sets a flag that the returned check, called every step, agrees on across ranks
    (an all-reduce). Before that (building, loading) SIGTERM ends the process as usual: a
    Python handler would not run while a rank waits in C++ for a dead peer."""
    import signal

    got = [0]

    def handler(signum, frame) -> None:
        if got[0]:  # a second SIGTERM: no more waiting
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        got[0] = 1
        logger.warning("SIGTERM: saving at the end of this step")

    def check() -> bool:
        if got[0] == 0 and signal.getsignal(signal.SIGTERM) is not handler:
            signal.signal(signal.SIGTERM, handler)
        flag = torch.tensor([got[0]])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag[0])

    return check


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _exit_when_orphaned()
    config_path = None
    if argv[:1] == ["--config"]:
        if len(argv) < 2:
            sys.exit("error: --config needs a file path")
        config_path, argv = argv[1], argv[2:]
    try:
        cfg = load_job_config(config_path, argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if cfg.training.warm_restarts:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            sys.exit(f"error: training.warm_restarts = {cfg.training.warm_restarts} needs "
                     "torchrun (its agent's store tells the ranks of a failure); set it to 0 "
                     "or launch with torchrun")
        on_done: list[Callable[[], None]] = []

        def trainer_process() -> None:
            _exit_when_orphaned()  # the keeper, this time
            _run(cfg, on_done)

        sys.exit(restart.keep(trainer_process, cfg.training.warm_restarts, on_done))
    _run(cfg, [])


def _run(cfg: JobConfig, on_done: list[Callable[[], None]]) -> None:
    """One trainer, from building to the final barrier; `on_done` runs right after it."""
    try:
        trainer = Trainer(cfg, preemption=_sigterm_flag())
        if cfg.checkpoint.create_seed_checkpoint:
            trainer.create_seed_checkpoint()
        else:
            trainer.train()
    except (ConfigError, CheckpointError, NonFiniteError) as e:
        logging.getLogger("raytitan").error("error: %s", e)
        sys.exit(f"error: {e}")
    dist.barrier()
    for callback in on_done:
        callback()
    dist.destroy_process_group()
    if trainer.preempted_at is not None:
        logger.info("stopped by SIGTERM: %s saved at step %d; resume repeats no step",
                    cfg.job.name, trainer.preempted_at)
        return
    # Every rank has finished its work (the barrier). NOTE: rarely a process still aborts
    # during interpreter shutdown afterwards (PLATFORM.md); this line tells the run was good.
    logger.info("done: %s at step %d", cfg.job.name, trainer.step)


if __name__ == "__main__":
    main()
