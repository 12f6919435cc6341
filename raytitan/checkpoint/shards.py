"""DCP's storage writer and reader for step directories (storage.py): the writer records
each shard file's size and CRC32, and each item's, as it writes (checksums.json); the reader
checks every item's CRC32 as it reads it, and on s3:// reads a rank's items in a few large
ranged GETs (objectstore.py).
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future
from torch.utils.serialization import config as torch_serialization

from raytitan.checkpoint.crc import crc32, crc32_combine
from raytitan.checkpoint.objectstore import RANGES_IN_FLIGHT, ParallelUpload, RangeReader
from raytitan.checkpoint.retry import with_retries
from raytitan.checkpoint.storage import (
    CHECKSUMS_FILE,
    CheckpointError,
    _is_local,
    is_s3,
)

# A WriteResult that carries one rank's {file: [size, crc32]} to the DCP coordinator; it is
# removed before DCP writes its metadata.
_CHECKSUM_FQN = "__raytitan_file_checksums__"


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
            self._item_crc = crc32(view, self._item_crc)
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


_zip_crc32_lock = threading.Lock()
_zip_crc32_off_count = 0
_zip_crc32_before = True


@contextmanager
def _zip_crc32_off(off: bool) -> Iterator[None]:
    """Turn off torch.save's CRC32 of each record of its zip while `off` (the writer records
    its own CRC32 of every item, which the reader checks; torch.load never checks torch's).
    It was a second pass over every byte: 0.19 -> 0.11 s per torch.save of 256 MB here.
    torch reads the flag per torch.save, process-wide; overlapping writers keep it off
    until the last one ends."""
    global _zip_crc32_off_count, _zip_crc32_before
    if not off:
        yield
        return
    save = torch_serialization.save
    with _zip_crc32_lock:
        if not _zip_crc32_off_count:
            _zip_crc32_before = save.compute_crc32
        _zip_crc32_off_count += 1
        save.compute_crc32 = False
    try:
        yield
    finally:
        with _zip_crc32_lock:
            _zip_crc32_off_count -= 1
            if not _zip_crc32_off_count:
                save.compute_crc32 = _zip_crc32_before


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
        def write():
            with _zip_crc32_off(self.fs.with_crc):
                return super(StepWriter, self).write_data(plan, planner).wait()

        results = with_retries(write, f"writing shards to {self.path}", self.retry_sec)
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
        if len(data) != sinfo.length or crc32(data) != expected[1]:
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
