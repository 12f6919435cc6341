"""The run configuration: one dataclass per TOML section.

These dataclasses are the only home of defaults. A TOML job file overrides them and
`--section.key value` flags override the file (see `manager.py`). Each field's docstring is
what `raytitan train --help` prints. Checks that need one field live in `__post_init__`;
checks across sections (mesh vs world size, batch arithmetic) live in `raytitan/plan.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, value and choices."""


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not valid; choose one of {list(choices)}")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} = {value!r} must be {bound}")


@dataclass
class Job:
    name: str = "raytitan"
    """Run name: the Ray run directory name, the TensorBoard run name and the checkpoint
    subfolder <checkpoint.folder>/<job.name>; one folder name (no '/', '\\', '.' or '..')."""

    dump_folder: str = "./outputs"
    """Folder for this run's outputs (metrics.jsonl, TensorBoard, Ray run state)."""

    description: str = ""
    """Free text describing the run; logged at start."""

    def __post_init__(self) -> None:
        # NOTE: the name is one folder under checkpoint.folder: '..' would put steps beside
        # other runs' folders, 'a/b' or 'a\\b' in a subfolder.
        if (self.name in ("", ".", "..") or "/" in self.name or "\\" in self.name
                or self.name[0].isspace()):
            raise ConfigError(
                f"job.name = {self.name!r} is not a valid run folder name: use a non-empty "
                "name without '/' or '\\', not '.' or '..', not starting with whitespace "
                "(e.g. 'llama3-8b')")


MODEL_FLAVORS = ("debug", "1B", "3B", "8B", "70B", "405B")


@dataclass
class Model:
    name: str = "llama3"
    """Model family. Only 'llama3' exists."""

    flavor: str = "debug"
    """Model size, one of: debug, 1B, 3B, 8B, 70B, 405B."""

    vocab_size: int = 0
    """Vocabulary size. 0 = the flavor's own (debug: the tokenizer's size)."""

    hf_assets_path: str = ""
    """A local Hugging Face model folder (config.json, *.safetensors, tokenizer files):
    what checkpoint.initial_load_in_hf loads when checkpoint.initial_load_path is empty.
    Tokenize the corpus with its tokenizer: raytitan prepare --tokenizer <this folder>."""

    def __post_init__(self) -> None:
        _check_choice("model.name", self.name, ("llama3",))
        _check_choice("model.flavor", self.flavor, MODEL_FLAVORS)
        _check_positive("model.vocab_size", self.vocab_size, allow_zero=True)


# float16 would need loss scaling, which we do not implement: bfloat16 does not.
DTYPES = ("float32", "bfloat16")
DECAY_TYPES = ("linear", "cosine", "sqrt")


@dataclass
class Training:
    steps: int = 10000
    """Number of optimizer steps to train."""

    seed: int = 0
    """Seed for weight init and the data order; the same seed gives the same run."""

    local_batch_size: int = 8
    """Samples per data-parallel rank per micro-step."""

    global_batch_size: int = -1
    """Samples per optimizer step over all ranks; -1 = local_batch_size * dp degree.
    Must be a multiple of local_batch_size * dp; the ratio is the gradient accumulation."""

    seq_len: int = 2048
    """Tokens per sample."""

    lr: float = 3e-4
    """Peak learning rate of AdamW."""

    weight_decay: float = 0.1
    """AdamW weight decay."""

    beta1: float = 0.9
    """AdamW beta1."""

    beta2: float = 0.95
    """AdamW beta2."""

    eps: float = 1e-8
    """AdamW epsilon."""

    warmup_steps: int = 200
    """Linear warm-up steps from 0 to lr."""

    decay_type: str = "cosine"
    """Decay after warm-up: linear, cosine or sqrt."""

    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""

    max_norm: float = 1.0
    """Gradient clipping max norm (L2, over all parameters); 0 disables clipping."""

    mixed_precision_param: str = "bfloat16"
    """Compute dtype of parameters in forward/backward: float32 or bfloat16.
    Master weights and optimizer state stay float32."""

    mixed_precision_reduce: str = "float32"
    """Dtype of gradient reduction across data-parallel ranks (FSDP): float32 or bfloat16."""

    deterministic: bool = False
    """Use deterministic algorithms (slower on GPU); runs with the same seed are bitwise equal."""

    num_threads: int = 0
    """CPU threads per process for torch ops; 0 = cores / local processes. Fixed per run so
    results do not depend on the launcher."""

    on_nonfinite: str = "stop"
    """A NaN/inf loss or gradient norm: stop (checked at every log step; the run ends with an
    error and commits nothing more) or skip (checked every step: that step's optimizer update
    is skipped). Weights that are not finite are never saved, whatever this is."""

    warm_restarts: int = 0
    """Under torchrun: times a failed rank's trainer is restarted warm, forked from a process
    that keeps Python and the imports (about a second, resuming from the newest checkpoint,
    fast tier first), before torchrun's own restarts (--max-restarts) take over. 0 = off.
    Not under Ray (ray.max_failures restarts the group)."""

    def __post_init__(self) -> None:
        _check_positive("training.steps", self.steps)
        _check_positive("training.local_batch_size", self.local_batch_size)
        if self.global_batch_size != -1:
            _check_positive("training.global_batch_size (or -1)", self.global_batch_size)
        _check_positive("training.seq_len", self.seq_len)
        _check_positive("training.lr", self.lr)
        _check_positive("training.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("training.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive("training.max_norm", self.max_norm, allow_zero=True)
        _check_positive("training.num_threads", self.num_threads, allow_zero=True)
        _check_positive("training.warm_restarts", self.warm_restarts, allow_zero=True)
        _check_choice("training.decay_type", self.decay_type, DECAY_TYPES)
        _check_choice("training.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _check_choice("training.mixed_precision_param", self.mixed_precision_param, DTYPES)
        _check_choice(
            "training.mixed_precision_reduce", self.mixed_precision_reduce, ("float32", "bfloat16")
        )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"training.min_lr_ratio = {self.min_lr_ratio} must be in [0, 1]")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"training.{name} = {value} must be in [0, 1)")


PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """Replicas of the model (DDP-style; with dp_shard > 1 this is HSDP)."""

    data_parallel_shard_degree: int = -1
    """FSDP2 shard degree; -1 = whatever the world size leaves after the other degrees."""

    tensor_parallel_degree: int = 1
    """Tensor parallel degree (with sequence parallel on norms)."""

    pipeline_parallel_degree: int = 1
    """Pipeline parallel degree (number of pipeline ranks)."""

    pipeline_parallel_schedule: str = "1F1B"
    """Pipeline schedule: GPipe, 1F1B or Interleaved1F1B (2 stages per pipeline rank)."""

    microbatches: int = -1
    """Pipeline microbatches per local batch; -1 = pipeline_parallel_degree."""

    def __post_init__(self) -> None:
        for name in ("data_parallel_replicate_degree", "tensor_parallel_degree",
                     "pipeline_parallel_degree"):
            _check_positive(f"parallelism.{name}", getattr(self, name))
        if self.data_parallel_shard_degree != -1:
            _check_positive("parallelism.data_parallel_shard_degree (or -1)",
                            self.data_parallel_shard_degree)
        if self.microbatches != -1:
            _check_positive("parallelism.microbatches (or -1)", self.microbatches)
        _check_choice("parallelism.pipeline_parallel_schedule", self.pipeline_parallel_schedule,
                      PP_SCHEDULES)


@dataclass
class ActivationCheckpoint:
    mode: str = "none"
    """none; full (recompute each block); selective (keep matmul and attention outputs,
    recompute the cheap element-wise ops)."""

    def __post_init__(self) -> None:
        _check_choice("activation_checkpoint.mode", self.mode, ("none", "full", "selective"))


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each transformer block (cold compile takes a while on CPU)."""


@dataclass
class Data:
    path: str = ""
    """A prepared dataset (folder with manifest.json, local or s3://). Empty = the builtin
    corpus (Python's own documentation), prepared into cache_dir on first use."""

    cache_dir: str = "~/.cache/raytitan"
    """Where the builtin corpus is prepared and cached."""

    tokenizer_vocab_size: int = 2048
    """Vocabulary size of the BPE trained for the builtin corpus."""

    def __post_init__(self) -> None:
        _check_positive("data.tokenizer_vocab_size", self.tokenizer_vocab_size)
        if self.tokenizer_vocab_size < 260:
            raise ConfigError(
                f"data.tokenizer_vocab_size = {self.tokenizer_vocab_size} must be >= 260 "
                "(256 bytes + special tokens)"
            )


@dataclass
class Metrics:
    log_freq: int = 10
    """Log metrics every this many steps (the first and last step are always logged)."""

    enable_tensorboard: bool = False
    """Write TensorBoard event files under <dump_folder>/tb/<job.name>."""

    peak_flops: float = 0.0
    """Peak bf16 FLOP/s of one device for MFU; 0 = look it up from the GPU name (unknown
    devices and CPUs report no MFU)."""

    def __post_init__(self) -> None:
        _check_positive("metrics.log_freq", self.log_freq)
        _check_positive("metrics.peak_flops", self.peak_flops, allow_zero=True)


@dataclass
class Ray:
    num_workers: int = 2
    """Training workers (one per GPU on GPU clusters); the world size."""

    use_gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo."""

    address: str = ""
    """Ray cluster to join ('auto', 'ray://host:10001', ...); empty = $RAY_ADDRESS if set,
    else start a local Ray on 127.0.0.1."""

    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""

    max_failures: int = 0
    """Worker-group restarts Ray allows before failing the run (-1 = unlimited)."""

    worker_resources: list[str] = field(default_factory=list)
    """Other Ray resources each worker reserves, as name=amount (e.g. a custom per-node
    resource to pin one worker per node: Ray's elastic sizing counts resources, not the
    placement strategy). CLI form: a=1,b=2."""

    min_workers: int = 0
    """Elastic training: Ray may run with any world size from min_workers to num_workers
    (fewer after a node is lost, more again when capacity returns; each change restarts the
    group, which resumes from the newest checkpoint with the same global batch). 0 = always
    num_workers."""

    resize_check_seconds: float = 60.0
    """Elastic training: how often Ray looks for capacity to grow the group."""

    preemption_check_steps: int = 5
    """Every this many steps the workers ask Ray for a preemption notice (each ask is a
    barrier over the workers, ~10 ms on CPU here); a notice is acted on within that many."""

    placement_strategy: str = "PACK"
    """How Ray places the workers: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one per node)."""

    def __post_init__(self) -> None:
        _check_positive("ray.num_workers", self.num_workers)
        _check_positive("ray.cpus_per_worker", self.cpus_per_worker)
        _check_positive("ray.resize_check_seconds", self.resize_check_seconds)
        _check_positive("ray.preemption_check_steps", self.preemption_check_steps)
        _check_choice("ray.placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES)
        for entry in self.worker_resources:
            name, _, amount = entry.partition("=")
            try:
                float(amount)
            except ValueError:
                name = ""
            if not name:
                raise ConfigError(f"ray.worker_resources entry {entry!r} is not name=amount "
                                  "(e.g. node_slot=1)")
        if not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError(f"ray.min_workers = {self.min_workers} must be between 0 (fixed "
                              f"size) and ray.num_workers = {self.num_workers}")
        if self.max_failures < -1:
            raise ConfigError(f"ray.max_failures = {self.max_failures} must be >= -1")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ASYNC_MODES = ("disabled", "async", "async_with_pinned_mem")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# Top-level keys of a checkpoint, the valid entries of exclude_from_loading.
CHECKPOINT_KEYS = ("model", "optimizer", "lr_scheduler", "train_state", "dataloader", "rng")
FAST_TIER_TYPES = ("local", "in_memory", "global")
FAST_TIER_ALGOS = ("fully_parallel", "atomic")
# Megatron's dist_ckpt_strictness values (see docs/checkpointing.md for what each does).
STRICTNESS = ("assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected",
              "raise_all", "return_unexpected", "return_all", "ignore_all")


@dataclass
class Checkpoint:
    enable: bool = False
    """Save checkpoints, and resume from the newest committed one in the folder."""

    folder: str = "checkpoint"
    """Checkpoint folder: relative to job.dump_folder, absolute, or s3://bucket/prefix.
    Steps live in <folder>/<job.name>/step-<N> (under Ray that is the Ray run directory)."""

    shared_filesystem: bool = False
    """A local `folder` is one filesystem mounted at the same path on every node (NFS,
    Lustre, FSx). Without this a local folder is refused on a multi-node run."""

    storage_options: list[str] = field(default_factory=list)
    """fsspec options for the folder's filesystem as key=value (e.g. endpoint_url=...).
    Credentials normally come from the standard AWS environment. Values are never written
    to a checkpoint or a log."""

    interval: int = 500
    """Save every this many steps (the last step is always saved)."""

    keep_latest_k: int = 0
    """Committed steps to keep (oldest deleted first; never the newest); 0 = keep all.
    Under Ray this is CheckpointConfig(num_to_keep)."""

    async_mode: str = "disabled"
    """disabled; async (stage a copy, persist in a background thread); async_with_pinned_mem
    (reused pinned + shared staging buffers on GPU, shared memory on CPU, filled in the
    background, persisted by a separate process). The final save is always synchronous."""

    save_optim: bool = True
    """Save the optimizer state."""

    save_rng: bool = True
    """Save every rank's RNG state (torch, CUDA, Python)."""

    save_tokenizer_assets: bool = True
    """Copy the dataset's tokenizer files into <step>/tokenizer/."""

    save_checksums: bool = True
    """Record a CRC32 of every file in the commit manifest (computed while writing)."""

    last_save_model_only: bool = False
    """The final save holds the model only (no optimizer, data position or RNG)."""

    export_dtype: str = "float32"
    """Dtype of the model in a model-only final save (and of its HF export): float32,
    bfloat16 or float16."""

    last_save_in_hf: bool = False
    """Also write the final step as a Hugging Face LlamaForCausalLM folder <step>/hf
    (config.json, tokenizer, sharded safetensors in export_dtype), covered by the step's
    commit. Any other committed step: raytitan convert to-hf STEP_DIR OUT."""

    load_step: int = -1
    """Step to resume from; -1 = the newest committed step."""

    load_optim: bool = True
    """Load the optimizer state when resuming."""

    load_rng: bool = True
    """Load the RNG state when resuming (ranks absent from the checkpoint keep their own)."""

    exclude_from_loading: list[str] = field(default_factory=list)
    """Top-level checkpoint keys not to load: model, optimizer, lr_scheduler, train_state,
    dataloader, rng. CLI form: a,b."""

    initial_load_path: str = ""
    """A step directory to start a fresh run from (used only when the folder has no
    committed step to resume)."""

    initial_load_model_only: bool = True
    """Load only the model from initial_load_path."""

    initial_load_in_hf: bool = False
    """The initial load is a Hugging Face folder (initial_load_path, else
    model.hf_assets_path): config.json must match the model; its weights are read tensor by
    tensor, each rank keeping its own shards."""

    exit_on_missing_checkpoint: bool = False
    """Fail instead of starting from scratch when there is nothing to load."""

    load_only: bool = False
    """Load checkpoints but never save any."""

    create_seed_checkpoint: bool = False
    """Build and initialize the model on one CPU process, save it as step-0, and exit.
    Every run started from it begins from the same weights, whatever its mesh."""

    dist_ckpt_strictness: str = "assume_ok_unexpected"
    """What a key mismatch on load does: assume_ok_unexpected, log_unexpected, log_all,
    raise_unexpected, raise_all, return_unexpected, return_all, ignore_all."""

    verify_integrity: bool = False
    """Also check every whole file's CRC32 before loading (reads the whole step once, split
    across ranks). Always, without this: file sizes, and the CRC32 of every item as it is
    loaded (weights, optimizer, data position, RNG)."""

    lease_timeout: float = 60.0
    """Seconds without a heartbeat after which another run may take over this run's folder
    (a run renews its lease every lease_timeout / 4 s; a second live run is refused)."""

    storage_retry_seconds: float = 60.0
    """How long a save keeps retrying transient storage errors (connection resets and
    refusals, timeouts, HTTP 5xx, throttling), with backoff, before it fails (0 = never)."""

    interval_seconds: float = 0.0
    """Also save when this many seconds have passed since the last save (0 = steps only)."""

    thread_count: int = 1
    """Threads per rank writing a persistent step (one shard file each: writes, CRC32s
    and fsyncs overlap; DCP's FileSystemWriter thread_count) and reading one (each its
    share of the rank's items). Measured in docs/benchmarks.md "Checkpoint save and load"."""

    fully_parallel_save: bool = True
    """A tensor held by several ranks (HSDP replicas, TP-replicated norms) is written once,
    the writers spread so every rank writes about the same bytes; false: the lowest rank
    holding it writes it (Megatron's fully_parallel_save)."""

    fully_parallel_load: bool = False
    """A tensor replicated over data-parallel replicas (dp_replicate) is read from storage
    by one replica, the others receive it over the network: each replica reads 1/R of the
    replicated bytes (Megatron's fully_parallel_load)."""

    ckpt_assume_constant_structure: bool = False
    """Reuse the save plans of the previous save of the same kind while the state's
    structure (keys, shapes, sharding) is unchanged: a save skips re-planning and the plan
    exchange. A changed structure is detected and re-planned."""

    # -- the fast (non-persistent) tier: docs/checkpointing.md "Tiers" ---------------------

    non_persistent_save_interval: int = 0
    """Save to the fast tier every this many steps (0 = no fast tier). Recovery takes the
    newest complete step of either tier."""

    non_persistent_interval_seconds: float = 0.0
    """Also save to the fast tier when this many seconds have passed since its last save."""

    non_persistent_ckpt_type: str = "local"
    """local: each rank writes its own state with torch.save to node-local storage
    (non_persistent_local_ckpt_dir); in_memory: each rank copies its tensors' raw bytes
    straight into a shared-memory file there (RAM by default; it outlives the process, no
    serialization, recovery maps it); global: torch.save to non_persistent_global_ckpt_dir,
    one filesystem every node mounts."""

    non_persistent_local_ckpt_dir: str = ""
    """Node-local fast-tier folder (local, in_memory); empty = /dev/shm/raytitan/<job.name>
    (RAM). For in_memory it should be RAM-backed (a tmpfs)."""

    non_persistent_global_ckpt_dir: str = ""
    """Shared fast-tier folder (non_persistent_ckpt_type = global); relative to
    job.dump_folder unless absolute. Old steps are deleted as soon as a newer one is whole."""

    non_persistent_local_ckpt_algo: str = "fully_parallel"
    """fully_parallel: a tensor replicated over ranks (TP-replicated norms, HSDP replicas)
    is written by one of them and sent to the others on recovery; atomic: every rank writes
    all it holds and recovers from its own file alone."""

    replication: bool = False
    """Also keep each rank's fast-tier state on replication_factor - 1 ranks of other nodes,
    so a lost node's state is recovered from its peers."""

    replication_jump: int = 0
    """Rank r's replicas go to ranks r + k * replication_jump (mod world size),
    k = 1 .. replication_factor - 1; 0 = the number of ranks per node."""

    replication_factor: int = 2
    """Copies of each rank's fast-tier state, its own included (on distinct nodes)."""

    def __post_init__(self) -> None:
        _check_positive("checkpoint.interval", self.interval)
        _check_positive("checkpoint.keep_latest_k", self.keep_latest_k, allow_zero=True)
        _check_positive("checkpoint.lease_timeout", self.lease_timeout)
        _check_positive("checkpoint.thread_count", self.thread_count)
        for name in ("storage_retry_seconds", "interval_seconds", "non_persistent_interval_seconds",
                     "non_persistent_save_interval", "replication_jump"):
            _check_positive(f"checkpoint.{name}", getattr(self, name), allow_zero=True)
        _check_choice("checkpoint.non_persistent_ckpt_type", self.non_persistent_ckpt_type,
                      FAST_TIER_TYPES)
        _check_choice("checkpoint.non_persistent_local_ckpt_algo",
                      self.non_persistent_local_ckpt_algo, FAST_TIER_ALGOS)
        if self.replication_factor < 2:
            raise ConfigError(f"checkpoint.replication_factor = {self.replication_factor} "
                              "must be >= 2 (the rank's own copy and at least one replica)")
        if self.non_persistent_ckpt_type == "global" and self.replication:
            raise ConfigError("checkpoint.replication applies to non_persistent_ckpt_type = "
                              "local or in_memory; a global fast tier is on shared storage "
                              "already")
        if (self.non_persistent_ckpt_type == "global" and self.fast_tier
                and not self.non_persistent_global_ckpt_dir):
            raise ConfigError("checkpoint.non_persistent_ckpt_type = global needs "
                              "checkpoint.non_persistent_global_ckpt_dir")
        _check_choice("checkpoint.async_mode", self.async_mode, ASYNC_MODES)
        _check_choice("checkpoint.export_dtype", self.export_dtype, EXPORT_DTYPES)
        _check_choice("checkpoint.dist_ckpt_strictness", self.dist_ckpt_strictness, STRICTNESS)
        if self.load_step < -1:
            raise ConfigError(f"checkpoint.load_step = {self.load_step} must be -1 or a step >= 0")
        for key in self.exclude_from_loading:
            _check_choice("checkpoint.exclude_from_loading entry", key, CHECKPOINT_KEYS)
        if not self.folder:
            raise ConfigError("checkpoint.folder must not be empty")
        for option in self.storage_options:
            if "=" not in option or not option.split("=", 1)[0]:
                raise ConfigError(
                    f"checkpoint.storage_options entry {option!r} is not key=value")


    @property
    def fast_tier(self) -> bool:
        return bool(self.non_persistent_save_interval or self.non_persistent_interval_seconds)


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    data: Data = field(default_factory=Data)
    metrics: Metrics = field(default_factory=Metrics)
    ray: Ray = field(default_factory=Ray)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
