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
import io
import json
import os
import re
import shutil
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import fsspec
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from raytitan.checkpoint.crc import crc32, crc32_combine
from raytitan.checkpoint.objectstore import RANGES_IN_FLIGHT, ParallelUpload, RangeReader
from raytitan.checkpoint.retry import with_retries

COMMIT_FILE = "COMMIT.json"
CHECKSUMS_FILE = "checksums.json"
INTENT_FILE = "SAVING.json"
RUN_FILE = "RUN.json"
QUARANTINE_DIR = "quarantine"
FORMAT = "raytitan-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# A WriteResult that carries one rank's {file: [size, crc32]} to the DCP coordinator; it is
# removed before DCP writes its metadata.
_CHECKSUM_FQN = "__raytitan_file_checksums__"
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
            crc = zlib.crc32(chunk, crc)
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


# -- DCP writer and reader --------------------------------------------------------------


class _CountingStream:
    """Passes writes through to the real file, counting bytes and (optionally) the CRC32 of
    the file and of each item in it. DCP calls tell() right before and right after writing
    each item, so the bytes between two tell()s are one item: {offset: [length, crc32]}."""

    def __init__(self, raw, with_crc: bool) -> None:
        self._raw = raw
        self._with_crc = with_crc
        self.size = 0
        self.crc = 0  # of the items ended so far (folded in by end_item: one pass per byte)
        self.items: dict[str, list[int]] = {}
        self._item_start, self._item_crc = 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.size += view.nbytes
        if self._with_crc:
            self._item_crc = zlib.crc32(view, self._item_crc)
        return self._raw.write(data)

    def tell(self) -> int:
        position = self._raw.tell()
        self.end_item(position)
        return position

    def end_item(self, position: int) -> None:
        """The bytes since the previous tell() form one item."""
        if self._with_crc and position > self._item_start:
            length = position - self._item_start
            self.items[str(self._item_start)] = [length, self._item_crc]
            self.crc = crc32_combine(self.crc, self._item_crc, length)
        self._item_start, self._item_crc = position, 0

    def __getattr__(self, name):  # tell, flush, fileno, close, ...
        return getattr(self._raw, name)


class _CountingFileSystem(FileSystem):
    """DCP's fsspec FileSystem, recording size and CRC32 of every file it writes."""

    def __init__(self, fs, with_crc: bool) -> None:
        super().__init__()
        self.fs = fs
        self.with_crc = with_crc
        self.written: dict[str, list[int | None]] = {}

    @contextmanager
    def create_stream(self, path, mode) -> Iterator:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        if is_s3(self.fs):  # parts go up in parallel while DCP writes the next ones
            upload = ParallelUpload(self.fs, os.fspath(path))
            counted = _CountingStream(upload, self.with_crc)
            try:
                yield counted
            except BaseException:
                upload.abort()
                raise
            upload.close()
        else:
            with super().create_stream(path, mode) as stream:
                counted = _CountingStream(stream, self.with_crc)
                yield counted
        counted.end_item(counted.size)  # the file was written from offset 0
        self.written[os.path.basename(os.fspath(path))] = [
            counted.size, counted.crc if self.with_crc else None, counted.items]


class StepWriter(FsspecWriter):
    """DCP's fsspec writer that also records each shard file's size and CRC32 as it is
    written (no second read) and has the coordinator store them in checksums.json."""

    def __init__(self, url: str, *, storage_options: dict[str, str], checksums: bool,
                 thread_count: int = 1, retry_sec: float = 0.0) -> None:
        super().__init__(url, thread_count=thread_count, **storage_options)
        self.retry_sec = retry_sec  # transient errors: this rank's files are written again
        # NOTE: fsync only means something on local disk; on object stores DCP would fall
        # back to os.sync() of the whole host.
        self.sync_files = _is_local(self.fs.fs)
        self.fs = _CountingFileSystem(self.fs.fs, checksums)

    def write_data(self, plan, planner):
        results = with_retries(lambda: super(StepWriter, self).write_data(plan, planner).wait(),
                               f"writing shards to {self.path}", self.retry_sec)
        carrier = WriteResult(index=MetadataIndex(_CHECKSUM_FQN), size_in_bytes=0,
                              storage_data=dict(self.fs.written))
        fut: Future = Future()
        fut.set_result([*results, carrier])
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        files: dict[str, list[int | None]] = {}
        clean = []
        for rank_results in results:
            clean.append([r for r in rank_results if r.index.fqn != _CHECKSUM_FQN])
            for r in rank_results:
                if r.index.fqn == _CHECKSUM_FQN:
                    files.update(r.storage_data)
        def write() -> None:
            with self.fs.create_stream(self.fs.concat_path(self.path, CHECKSUMS_FILE),
                                       "wb") as f:
                f.write(json.dumps(files, sort_keys=True).encode())
            super(StepWriter, self).finish(metadata, clean)

        with_retries(write, f"writing the metadata of {self.path}", self.retry_sec)


class StepReader(FsspecReader):
    """DCP's fsspec reader that checks the CRC32 of every item as it reads it (recorded by
    StepWriter in checksums.json): a flipped bit in a shard, the data position or the RNG
    state fails the load, naming the file and the key, without a second pass over the data.

    Args:
        items: {file: {offset: [length, crc32]}}; items not in it are read unchecked.
        threads: read (and check) this rank's items in this many threads, each its own
            share of the bytes in file order, so reads, CRC32s and deserialization overlap.
            On s3:// the items are taken in file order from a RangeReader instead, with
            max(threads, RANGES_IN_FLIGHT) ranged GETs in flight.
    """

    def __init__(self, url: str, storage_options: dict, items: dict[str, dict],
                 threads: int = 1) -> None:
        super().__init__(url, **storage_options)
        self.url = url
        self.items = items
        self.threads = threads
        self.remote = is_s3(self.fs.fs)  # items come from self._ranges
        self._ranges: RangeReader | None = None
        self.checked_items = 0
        self.checked_bytes = 0
        self.read_bytes = 0
        self._count_lock = threading.Lock()

    def read_data(self, plan, planner):
        info = lambda item: self.storage_data[item.storage_index]  # noqa: E731
        if self.remote:
            in_file_order = sorted(plan.items, key=lambda i: (info(i).relative_path,
                                                              info(i).offset))
            self._ranges = RangeReader(
                self.fs.fs, [(self.fs.concat_path(self.path, info(i).relative_path),
                              info(i).offset, info(i).length) for i in in_file_order],
                in_flight=max(self.threads, RANGES_IN_FLIGHT))
            try:
                return super().read_data(replace(plan, items=in_file_order), planner)
            finally:
                self._ranges.close()
                self._ranges = None
        if self.threads < 2 or len(plan.items) < 2:
            return super().read_data(plan, planner)
        shares: list[list] = [[] for _ in range(self.threads)]
        loads = [0] * self.threads
        for item in sorted(plan.items, key=lambda i: info(i).length, reverse=True):
            k = loads.index(min(loads))  # largest items first, each to the least-loaded
            shares[k].append(item)
            loads[k] += info(item).length

        def read(share: list) -> None:
            in_file_order = sorted(share, key=lambda i: (info(i).relative_path, info(i).offset))
            super(StepReader, self).read_data(replace(plan, items=in_file_order), planner).wait()

        with ThreadPoolExecutor(self.threads, thread_name_prefix="step-reader") as pool:
            list(pool.map(read, [share for share in shares if share]))  # raises the first error
        done: Future = Future()
        done.set_result(None)
        return done

    def _slice_file(self, file, sinfo):
        with self._count_lock:
            self.read_bytes += sinfo.length
        expected = self.items.get(sinfo.relative_path, {}).get(str(sinfo.offset))
        checked = expected is not None and expected[0] == sinfo.length
        if not checked and not self.remote:
            return super()._slice_file(file, sinfo)
        if self.remote:
            data = self._ranges.take(self.fs.concat_path(self.path, sinfo.relative_path),
                                     sinfo.offset, sinfo.length)
        else:
            file.seek(sinfo.offset)
            data = file.read(sinfo.length)
        if not checked:
            return io.BytesIO(data)
        if len(data) != sinfo.length or zlib.crc32(data) != expected[1]:
            key = next((index.fqn for index, info in self.storage_data.items()
                        if info is sinfo), "?")
            raise CheckpointError(
                f"{self.url}/{sinfo.relative_path} is damaged: the {sinfo.length} bytes at "
                f"offset {sinfo.offset} ({key}) do not match the CRC32 recorded when they "
                "were written")
        with self._count_lock:
            self.checked_items += 1
            self.checked_bytes += len(data)
        return io.BytesIO(data)


def step_reader(url: str, storage_options: dict[str, str],
                items: dict[str, dict] | None = None, threads: int = 1) -> StepReader:
    """A DCP reader of a step; with `items` (from checksums.json) it checks every item."""
    return StepReader(url, storage_options, items or {}, threads)
