"""Where checkpoints live: step directories on any fsspec filesystem (local disk, s3://).

    <root>/RUN.json                                         the folder's run id (lineage)
    <root>/LEASE.json                                       the run writing here now (lease.py)
    <root>/step-<N>/  SAVING.json                          rank 0, FIRST: run id + step
                      .metadata  __<rank>_<i>.distcp ...   DCP shards, written by every rank
                      checksums.json                       size + CRC32 of each shard file and
                                                           of each item in it
                      run_config.toml  tokenizer/          rank 0
                      COMMIT.json                          rank 0, LAST

A step is *committed* iff its COMMIT.json exists, parses and names this step. Only committed
steps are loaded, counted as latest or kept by retention. COMMIT.json is written only after
DCP's save has returned on the coordinator, which happens after every rank's shards are
written (and fsync'd on local disk), and after rank 0 has seen every listed file with its
size, so a crash at any moment leaves either a committed step that is complete or an
uncommitted one that is never loaded. An uncommitted directory is deleted only when its
SAVING.json proves it is this run's own interrupted save; anything else (a damaged
COMMIT.json, a directory without SAVING.json, another run's save) is never deleted: it is
reported, and moved to <root>/quarantine/ if a save needs its name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime

import fsspec

from raytitan.checkpoint.crc import crc32

COMMIT_FILE = "COMMIT.json"
CHECKSUMS_FILE = "checksums.json"
INTENT_FILE = "SAVING.json"
RUN_FILE = "RUN.json"
QUARANTINE_DIR = "quarantine"
FORMAT = "raytitan-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit this run."""


def step_name(step: int) -> str:
    return f"step-{step}"


def split_step_dir(url: str) -> tuple[str, int]:
    """'<folder>/step-<N>' -> ('<folder>', N), or a ValueError naming the expected form."""
    parent, _, name = url.rstrip("/").rpartition("/")
    match = _STEP_DIR.match(name)
    if not match:
        raise ValueError(f"{url} is not a step directory (<folder>/step-<N>)")
    return parent or ("/" if url.startswith("/") else "."), int(match.group(1))


def parse_storage_options(options: list[str]) -> dict[str, object]:
    """["key=value", ...] -> fsspec kwargs; true/false and integers are converted (s3fs
    would read the string "false" as true)."""
    out: dict[str, object] = {}
    for option in options:
        key, value = option.split("=", 1)
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        elif value.lstrip("-").isdigit():
            out[key] = int(value)
        else:
            out[key] = value
    return out


# What a step directory is (see the module docstring).
COMMITTED = "committed"
INTERRUPTED = "interrupted"  # no COMMIT.json; its SAVING.json names the run that wrote it
DAMAGED = "damaged"  # a COMMIT.json that does not parse, names another step or format
UNKNOWN = "unknown"  # no COMMIT.json and no SAVING.json: nobody can say what it is


@dataclass
class StepInfo:
    step: int
    state: str
    commit: dict | None = None
    intent: dict | None = None
    problem: str = ""
    """Why the directory is damaged or unknown, for messages."""

    @property
    def committed(self) -> bool:
        return self.state == COMMITTED

    @property
    def lineage(self) -> str | None:
        """The run id that committed (or started saving) this step; None before run ids."""
        return (self.commit or self.intent or {}).get("lineage")


def in_commit_order(steps: list[StepInfo], lineage: str | None = None) -> list[StepInfo]:
    """The committed steps (of `lineage`, if given) in the order they were committed (a run
    resumed from an older step makes newer commits with smaller step numbers). Steps from
    before run ids were recorded belong to every lineage."""
    own = [s for s in steps if s.committed and (lineage is None or s.lineage in (None, lineage))]
    return sorted(own, key=lambda s: (s.commit.get("sequence", 0), s.step))


def latest_full(steps: list[StepInfo], lineage: str | None = None) -> StepInfo | None:
    """The most recently committed full-state step of `lineage` (model-only exports cannot
    be resumed)."""
    full = [s for s in in_commit_order(steps, lineage) if not s.commit.get("model_only")]
    return full[-1] if full else None


def _protocols(fs) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _is_local(fs) -> bool:
    return "file" in _protocols(fs) or "local" in _protocols(fs)


def is_s3(fs) -> bool:
    return "s3" in _protocols(fs) and hasattr(fs, "call_s3")


class CheckpointStorage:
    """The folder of one run's step directories, on the filesystem its URL names."""

    def __init__(self, url: str, storage_options: dict[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        self.is_local = _is_local(self.fs)

    def __repr__(self) -> str:
        return f"CheckpointStorage({self.url!r})"

    # -- paths --------------------------------------------------------------------------

    def step_url(self, step: int) -> str:
        """The URL DCP's fsspec writer and reader are given (keeps the s3:// scheme)."""
        return f"{self.url}/{step_name(step)}"

    def step_path(self, step: int, *parts: str) -> str:
        return "/".join([self.root, step_name(step), *parts])

    # -- listing ------------------------------------------------------------------------

    def list_steps(self) -> list[StepInfo]:
        """Every step directory in the folder, with what it is, oldest first."""
        self.fs.invalidate_cache(self.root)  # other processes wrote here
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        steps = []
        for entry in entries:
            match = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                steps.append(self.step_info(int(match.group(1))))
        return sorted(steps, key=lambda s: s.step)

    def step_info(self, step: int) -> StepInfo:
        """What the directory of `step` is: committed, interrupted, damaged or unknown."""
        self.fs.invalidate_cache(self.step_path(step))
        commit, problem = self._read_json(step, COMMIT_FILE)
        if commit is not None:
            if commit.get("step") != step:
                return StepInfo(step, DAMAGED, problem=f"{COMMIT_FILE} names step "
                                f"{commit.get('step')!r}, not {step}")
            if commit.get("format") != FORMAT:
                return StepInfo(step, DAMAGED, problem=f"{COMMIT_FILE} has format "
                                f"{commit.get('format')!r}; this raytitan reads {FORMAT!r}")
            return StepInfo(step, COMMITTED, commit=commit)
        if problem:
            return StepInfo(step, DAMAGED, problem=problem)
        intent, problem = self._read_json(step, INTENT_FILE)
        if intent is not None and intent.get("step") == step:
            return StepInfo(step, INTERRUPTED, intent=intent)
        return StepInfo(step, UNKNOWN, problem=problem or f"no {COMMIT_FILE} and no "
                        f"{INTENT_FILE}: not written by this raytitan, or copied in part")

    def _read_json(self, step: int, name: str) -> tuple[dict | None, str]:
        """(the parsed file, "") or (None, why not); (None, "") if it does not exist."""
        try:
            with self.fs.open(self.step_path(step, name), "rb") as f:
                value = json.loads(f.read())
        except FileNotFoundError:
            return None, ""
        except ValueError as e:
            return None, f"{name} does not parse ({e})"
        if not isinstance(value, dict):
            return None, f"{name} is not a JSON object"
        return value, ""

    def committed_steps(self) -> list[int]:
        return [s.step for s in self.list_steps() if s.committed]

    def read_commit(self, step: int) -> dict | None:
        """The commit manifest of `step`, or None unless the step is committed."""
        return self.step_info(step).commit

    def read_run(self) -> dict | None:
        """The folder's RUN.json (its lineage), or None in a new folder. A damaged one is an
        error: without it no step can be told to be this run's own."""
        path = f"{self.root}/{RUN_FILE}"
        try:
            with self.fs.open(path, "rb") as f:
                run = json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise CheckpointError(f"{self.url}/{RUN_FILE} does not parse ({e}): repair it "
                                  "from a step's COMMIT.json ('lineage'), or move it away "
                                  "to make this folder a new run") from e
        if not isinstance(run, dict) or not run.get("lineage"):
            raise CheckpointError(f"{self.url}/{RUN_FILE} has no lineage: {run!r}")
        return run

    def write_run(self, run: dict) -> None:
        write_bytes(self.fs, f"{self.root}/{RUN_FILE}", json.dumps(run, indent=1).encode())

    # -- writing ------------------------------------------------------------------------

    def write_file(self, step: int, relpath: str, data: bytes) -> None:
        write_bytes(self.fs, self.step_path(step, relpath), data)

    def step_exists(self, step: int) -> bool:
        self.fs.invalidate_cache(self.root)
        return self.fs.exists(self.step_path(step))

    def write_commit(self, step: int, manifest: dict) -> None:
        """Write COMMIT.json atomically: on local disk, first make everything it lists and
        the directory entries durable (DCP fsyncs its shards, not checksums.json or the
        directories), then write a temp file, fsync, rename. On object stores: one PUT."""
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        path = self.step_path(step, COMMIT_FILE)
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return
        for name in (CHECKSUMS_FILE, ".metadata"):
            _fsync_file(self.step_path(step, name))
        _fsync_dir(self.step_path(step))
        _fsync_dir(self.root)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))

    def commit_step(self, step: int, fields: dict, *, files: dict[str, bytes],
                    written: dict[str, dict] | None = None, checksums: bool = True
                    ) -> tuple[dict, list[StepInfo]]:
        """Commit `step` once DCP's save has returned: write the extra `files`, then
        COMMIT.json listing every file (DCP's shards from checksums.json, `.metadata`,
        `files`, and `written`: files others already wrote, {name: {size, crc32}}) with
        `fields`. Returns the manifest and the folder's steps (this one committed)."""
        entries = {name: {"size": size, "crc32": crc}
                   for name, (size, crc, *_) in self.read_checksums(step).items()}
        for name in (".metadata", CHECKSUMS_FILE, INTENT_FILE):
            try:
                with self.fs.open(self.step_path(step, name), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                if name == INTENT_FILE:  # steps written by `convert from-hf` have none
                    continue
                raise
            entries[name] = {"size": len(data), "crc32": crc32(data)}
        for name, data in files.items():
            self.write_file(step, name, data)
            entries[name] = {"size": len(data), "crc32": crc32(data)}
        entries.update(written or {})
        if not checksums:
            entries = {name: {"size": entry["size"]} for name, entry in entries.items()}
        if problems := self.check_sizes(step, {"files": entries}):
            raise CheckpointError(
                f"{self.step_url(step)} is not committed: {'; '.join(problems[:5])}. The "
                "ranks wrote files this process cannot see: is checkpoint.folder a node-local "
                "path on a multi-node cluster? Use shared storage (s3://, NFS)")
        # This step is listed too, still uncommitted: it takes its place once committed.
        steps = [s for s in self.list_steps() if s.step != step]
        committed = in_commit_order(steps, fields.get("lineage"))
        manifest = {
            "format": FORMAT,
            "step": step,
            "sequence": 1 + (committed[-1].commit.get("sequence", 0) if committed else 0),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            **fields,
            "files": entries,
        }
        self.write_commit(step, manifest)
        return manifest, [*steps, StepInfo(step, COMMITTED, commit=manifest)]

    def remove_step(self, step: int) -> None:
        """Delete a step directory, COMMIT.json first: a crash halfway leaves an
        uncommitted directory, never a committed one with files missing."""
        commit = self.step_path(step, COMMIT_FILE)
        if self.fs.exists(commit):
            self.fs.rm_file(commit)
        if self.fs.exists(self.step_path(step)):
            self.fs.rm(self.step_path(step), recursive=True)
        self.fs.invalidate_cache(self.root)

    def write_intent(self, step: int, fields: dict) -> None:
        """SAVING.json, before any shard: proof that an uncommitted directory is the
        interrupted save of the run it names (only such a directory is ever deleted)."""
        self.write_file(step, INTENT_FILE, json.dumps({"step": step, **fields}).encode())

    def quarantine(self, step: int) -> str:
        """Move a step directory out of the way, to <root>/quarantine/step-<N>.<time>;
        returns where it went. Never deletes anything."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        dest = f"{self.root}/{QUARANTINE_DIR}/{step_name(step)}.{stamp}"
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(self.step_path(step), dest, recursive=True)
        self.fs.invalidate_cache(self.root)
        return dest if self.is_local else f"{self.url.split('://')[0]}://{dest}"

    def check_access(self) -> None:
        """Fail before training when the folder's storage cannot be used: a missing bucket,
        refused credentials, no server. raytitan never creates a bucket."""
        if self.is_local:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.invalidate_cache()
            exists = self.fs.exists(bucket)
            if exists:
                self.fs.ls(bucket, detail=False)  # credentials that may list it
        except Exception as e:
            error = CheckpointError(
                f"checkpoint folder {self.url} cannot be reached: {describe_error(e)}. Check "
                "the endpoint (storage_options endpoint_url, AWS_ENDPOINT_URL), the "
                "credentials and the network")
            error.retryable = True  # a storage outage may pass: Ray may restart the run
            raise error from e
        if not exists:
            raise CheckpointError(
                f"checkpoint folder {self.url}: bucket {bucket!r} does not exist (raytitan "
                "never creates buckets: a typo, or an emptied account?). Create it, or fix "
                "checkpoint.folder")

    def read_checksums(self, step: int) -> dict[str, list]:
        with self.fs.open(self.step_path(step, CHECKSUMS_FILE), "rb") as f:
            return json.loads(f.read())

    # -- verification -------------------------------------------------------------------

    def file_sizes(self, step: int) -> dict[str, int]:
        base = self.step_path(step)
        self.fs.invalidate_cache(base)
        found = self.fs.find(base, detail=True)
        return {path[len(base) + 1:]: int(info["size"]) for path, info in found.items()}

    def check_sizes(self, step: int, commit: dict) -> list[str]:
        """Problems with the files of a committed step: missing or of the wrong size."""
        sizes = self.file_sizes(step)
        problems = []
        for name, entry in sorted(commit["files"].items()):
            if name not in sizes:
                problems.append(f"{name} is missing")
            elif sizes[name] != entry["size"]:
                problems.append(f"{name} has {sizes[name]} bytes, the commit recorded "
                                f"{entry['size']}")
        return problems

    def check_crc(self, step: int, commit: dict, names: list[str]) -> list[str]:
        """Re-read `names` and compare their CRC32 with the commit manifest."""
        problems = []
        for name in names:
            want = commit["files"][name].get("crc32")
            if want is None:
                continue
            crc = file_crc(self.fs, self.step_path(step, name))
            if crc != want:
                problems.append(f"{name} has CRC32 {crc:08x}, the commit recorded {want:08x}")
        return problems


def write_bytes(fs, path: str, data: bytes) -> None:
    """Write a whole file atomically: one PUT on object stores; on local disk a temp file,
    fsync'd, renamed over `path`, and the directory entry fsync'd (never a torn file)."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def file_crc(fs, path: str) -> int:
    """CRC32 of a file, read in chunks."""
    crc = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = crc32(chunk, crc)
    return crc


def describe_error(error: BaseException) -> str:
    """One line for an error: DCP's per-rank causes, an OSError's errno name (ENOSPC...)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, failure in sorted(failures.items()):
            cause = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {rank}: {describe_error(cause)}")
        return "; ".join(parts)
    text = f"{type(error).__name__}: {error}"
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in errno.errorcode:
            name = errno.errorcode[cause.errno]
            return text if name in text else f"{text} ({name})"
        cause = cause.__cause__ or cause.__context__
    return text


def disk_full_note(path: str) -> str:
    """' The disk holding PATH is full (ENOSPC, N MB free).' when it nearly is, else ''.
    torch.save reports a short write as 'unexpected pos', without the errno."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return ""
    if usage.free < max(256 << 20, usage.total // 100):
        return f" The disk holding {path} is full (ENOSPC, {usage.free / 1e6:.0f} MB free)."
    return ""


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
