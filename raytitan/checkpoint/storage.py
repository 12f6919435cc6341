"""Where checkpoints live: step directories on any fsspec filesystem (local disk, s3://).

    <root>/step-<N>/  .metadata  __<rank>_<i>.distcp ...   DCP shards, written by every rank
                      checksums.json                       size + CRC32 of each shard file
                      run_config.toml  tokenizer/          rank 0
                      COMMIT.json                          rank 0, LAST

A step is *committed* iff its COMMIT.json exists and parses. Only committed steps are loaded,
counted as latest or kept by retention. COMMIT.json is written only after DCP's save has
returned on the coordinator, which happens after every rank's shards are written (and
fsync'd on local disk), so a crash at any moment leaves either a committed step that is
complete or an uncommitted one that is ignored and cleaned later.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import fsspec
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

COMMIT_FILE = "COMMIT.json"
CHECKSUMS_FILE = "checksums.json"
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


@dataclass
class StepInfo:
    step: int
    committed: bool
    commit: dict | None


def in_commit_order(steps: list[StepInfo]) -> list[StepInfo]:
    """The committed steps in the order they were committed (a run resumed from an older
    step makes newer commits with smaller step numbers)."""
    return sorted((s for s in steps if s.committed),
                  key=lambda s: (s.commit.get("sequence", 0), s.step))


def latest_full(steps: list[StepInfo]) -> StepInfo | None:
    """The most recently committed full-state step (model-only exports cannot be resumed)."""
    full = [s for s in in_commit_order(steps) if not s.commit.get("model_only")]
    return full[-1] if full else None


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


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
        """Every step directory in the folder, committed or not, oldest first."""
        self.fs.invalidate_cache(self.root)  # other processes wrote here
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        steps = []
        for entry in entries:
            match = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                step = int(match.group(1))
                commit = self.read_commit(step)
                steps.append(StepInfo(step, commit is not None, commit))
        return sorted(steps, key=lambda s: s.step)

    def committed_steps(self) -> list[int]:
        return [s.step for s in self.list_steps() if s.committed]

    def read_commit(self, step: int) -> dict | None:
        """The commit manifest of `step`, or None if it is absent or unreadable (a torn
        write counts as not committed)."""
        path = self.step_path(step, COMMIT_FILE)
        self.fs.invalidate_cache(self.step_path(step))
        try:
            with self.fs.open(path, "rb") as f:
                commit = json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
        return commit if isinstance(commit, dict) and commit.get("step") == step else None

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
                   for name, (size, crc) in self.read_checksums(step).items()}
        for name in (".metadata", CHECKSUMS_FILE):
            with self.fs.open(self.step_path(step, name), "rb") as f:
                data = f.read()
            entries[name] = {"size": len(data), "crc32": crc32(data)}
        for name, data in files.items():
            self.write_file(step, name, data)
            entries[name] = {"size": len(data), "crc32": crc32(data)}
        entries.update(written or {})
        if not checksums:
            entries = {name: {"size": entry["size"]} for name, entry in entries.items()}
        # This step is listed too, still uncommitted: it takes its place once committed.
        steps = [s for s in self.list_steps() if s.step != step]
        committed = in_commit_order(steps)
        manifest = {
            "format": FORMAT,
            "step": step,
            "sequence": 1 + (committed[-1].commit.get("sequence", 0) if committed else 0),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            **fields,
            "files": entries,
        }
        self.write_commit(step, manifest)
        return manifest, [*steps, StepInfo(step, True, manifest)]

    def remove_step(self, step: int) -> None:
        """Delete a step directory, COMMIT.json first: a crash halfway leaves an
        uncommitted directory, never a committed one with files missing."""
        commit = self.step_path(step, COMMIT_FILE)
        if self.fs.exists(commit):
            self.fs.rm_file(commit)
        if self.fs.exists(self.step_path(step)):
            self.fs.rm(self.step_path(step), recursive=True)
        self.fs.invalidate_cache(self.root)

    def read_checksums(self, step: int) -> dict[str, list[int]]:
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
    """Write a whole file: one PUT on object stores; on local disk, durably (the file and
    its directory entry fsync'd)."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(os.path.dirname(path))


def file_crc(fs, path: str) -> int:
    """CRC32 of a file, read in chunks."""
    crc = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crc32(data: bytes) -> int:
    return zlib.crc32(data)


# -- DCP writer and reader --------------------------------------------------------------


class _CountingStream:
    """Passes writes through to the real file, counting bytes and (optionally) CRC32."""

    def __init__(self, raw, with_crc: bool) -> None:
        self._raw = raw
        self._with_crc = with_crc
        self.size = 0
        self.crc = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.size += view.nbytes
        if self._with_crc:
            self.crc = zlib.crc32(view, self.crc)
        return self._raw.write(data)

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
        with super().create_stream(path, mode) as stream:
            counted = _CountingStream(stream, self.with_crc)
            yield counted
        self.written[os.path.basename(os.fspath(path))] = [
            counted.size, counted.crc if self.with_crc else None]


class StepWriter(FsspecWriter):
    """DCP's fsspec writer that also records each shard file's size and CRC32 as it is
    written (no second read) and has the coordinator store them in checksums.json."""

    def __init__(self, url: str, *, storage_options: dict[str, str], checksums: bool,
                 thread_count: int = 1) -> None:
        super().__init__(url, thread_count=thread_count, **storage_options)
        # NOTE: fsync only means something on local disk; on object stores DCP would fall
        # back to os.sync() of the whole host.
        self.sync_files = _is_local(self.fs.fs)
        self.fs = _CountingFileSystem(self.fs.fs, checksums)

    def write_data(self, plan, planner):
        results = super().write_data(plan, planner).wait()
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
        with self.fs.create_stream(self.fs.concat_path(self.path, CHECKSUMS_FILE), "wb") as f:
            f.write(json.dumps(files, sort_keys=True).encode())
        super().finish(metadata, clean)


def step_reader(url: str, storage_options: dict[str, str]) -> FsspecReader:
    return FsspecReader(url, **storage_options)
