"""`raytitan ckpt ls | show | verify`: look into checkpoint folders and step directories,
local or s3://, without a process group or a model."""

from __future__ import annotations

import tomllib
import warnings

from raytitan.checkpoint.shards import step_reader
from raytitan.checkpoint.storage import (
    COMMIT_FILE,
    FORMAT,
    CheckpointError,
    CheckpointStorage,
    latest_full,
    parse_storage_options,
    split_step_dir,
)


def _check_step_exists(storage: CheckpointStorage, step: int, step_dir: str) -> None:
    """Raise a CheckpointError naming the steps there are if `step_dir` does not exist."""
    if storage.step_exists(step):
        return
    steps = [s.step for s in storage.list_steps()]
    raise CheckpointError(f"{step_dir} does not exist; step directories in {storage.url}: "
                          f"{steps or 'none'} (raytitan ckpt ls {storage.url})")


def ls(folder: str, options: list[str]) -> str:
    """One line per step directory: committed or not, size, mesh, time; and which step a run
    would resume from.

    Raises:
        CheckpointError: `folder` does not exist (an empty folder lists no steps).
    """
    storage = CheckpointStorage(folder, parse_storage_options(options))
    steps = storage.list_steps()
    if not steps:
        if not storage.fs.exists(storage.root):
            raise CheckpointError(f"{folder} does not exist (ls takes a run folder, "
                                  "<checkpoint.folder>/<job.name>)")
        return f"{folder}: no step directories"
    latest = latest_full(steps)
    lines = [f"{'step':>8}  {'state':<11} {'size MB':>9}  {'world':>5}  {'mesh':<24} "
             f"{'content':<18} time"]
    for info in steps:
        if info.committed:
            commit = info.commit
            size = sum(f["size"] for f in commit["files"].values())
            mesh = "x".join(f"{k}{v}" for k, v in commit.get("mesh", {}).items() if v > 1)
            content = ("model " + commit.get("dtype", "")) if commit.get("model_only") \
                else "full"
            if commit.get("hf"):
                content += " +hf"
            state = "committed" + (" *" if info is latest else "")
            lines.append(f"{info.step:>8}  {state:<11} {size / 1e6:>9.1f}  "
                         f"{commit.get('world_size', '?'):>5}  {mesh or '-':<24} "
                         f"{content:<18} {commit.get('time', '')}")
        else:
            size = sum(storage.file_sizes(info.step).values())
            lines.append(f"{info.step:>8}  {'UNCOMMITTED':<11} {size / 1e6:>9.1f}  "
                         f"{'-':>5}  {'-':<24} {'(interrupted save)':<18}")
    if latest is not None:
        lines.append(f"* resumed from by default (step {latest.step})")
    return "\n".join(lines)


def show(step_dir: str, options: list[str]) -> str:
    """Commit manifest, train state, data position, run config and every key's shape/dtype.

    Raises:
        CheckpointError: `step_dir` does not exist.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    parent, step = split_step_dir(step_dir)
    storage = CheckpointStorage(parent, parse_storage_options(options))
    commit = storage.read_commit(step)
    if commit is None:
        _check_step_exists(storage, step, step_dir)
    lines = [f"{storage.step_url(step)}: " + (
        "committed" if commit else "NOT COMMITTED (an interrupted save; never loaded)")]
    if commit:
        lines.append(f"  committed {commit.get('time')}, world size {commit.get('world_size')}, "
                     f"mesh {commit.get('mesh')}, keys {commit.get('keys')}, "
                     f"{'model only ' + str(commit.get('dtype')) if commit.get('model_only') else 'full state'}")
        if commit.get("hf"):
            hf_files = [name for name in commit["files"] if name.startswith(commit["hf"] + "/")]
            lines.append(f"  Hugging Face export: {storage.step_url(step)}/{commit['hf']} "
                         f"({len(hf_files)} files)")
    metadata = step_reader(storage.step_url(step), storage.options).read_metadata()
    entries = metadata.state_dict_metadata
    small = {key: None for key, meta in entries.items()
             if isinstance(meta, BytesStorageMetadata)
             and key.split(".", 1)[0] in ("train_state", "dataloader", "lr_scheduler")}
    if small:
        nested: dict = {}
        for key in small:
            group, _, name = key.partition(".")
            nested.setdefault(group, {})[name] = None
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(nested, no_dist=True,
                     storage_reader=step_reader(storage.step_url(step), storage.options))
        for group, values in sorted(nested.items()):
            lines.append(f"  {group}: {values}")
    try:
        with storage.fs.open(storage.step_path(step, "run_config.toml"), "rb") as f:
            config = tomllib.load(f)
        model, training = config.get("model", {}), config.get("training", {})
        lines.append(f"  run config: model {model.get('flavor')}, {training.get('steps')} "
                     f"steps, seq_len {training.get('seq_len')}, seed {training.get('seed')}")
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        pass
    lines.append(f"  {len(entries)} keys:")
    for key in sorted(entries):
        meta = entries[key]
        if isinstance(meta, BytesStorageMetadata):
            lines.append(f"    {key}  (object)")
        else:
            lines.append(f"    {key}  {list(meta.size)}  "
                         f"{str(meta.properties.dtype).removeprefix('torch.')}")
    return "\n".join(lines)


def verify(step_dir: str, options: list[str]) -> tuple[bool, str]:
    """Check the commit manifest, every file's size and (where recorded) CRC32.

    Raises:
        CheckpointError: `step_dir` does not exist (an uncommitted one is (False, why)).
    """
    parent, step = split_step_dir(step_dir)
    storage = CheckpointStorage(parent, parse_storage_options(options))
    url = storage.step_url(step)
    commit = storage.read_commit(step)
    if commit is None:
        _check_step_exists(storage, step, step_dir)
        return False, f"{url}: no readable {COMMIT_FILE}: not a committed step"
    if commit.get("format") != FORMAT:
        return False, f"{url}: format {commit.get('format')!r}, expected {FORMAT!r}"
    problems = storage.check_sizes(step, commit)
    if not problems:
        problems = storage.check_crc(step, commit, sorted(commit["files"]))
    if problems:
        return False, f"{url} is DAMAGED:\n" + "\n".join(f"  {p}" for p in problems)
    with_crc = sum("crc32" in f for f in commit["files"].values())
    total = sum(f["size"] for f in commit["files"].values())
    return True, (f"{url}: OK, {len(commit['files'])} files, {total / 1e6:.1f} MB, "
                  f"sizes checked, CRC32 of {with_crc} files checked")
