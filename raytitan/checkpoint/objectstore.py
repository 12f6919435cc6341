"""Shard I/O on S3 at the object store's speed, not one stream's.

s3fs's file object uploads the parts of a multipart upload one after another from the
writing thread, and DCP's reader pulls each item through it in read-ahead blocks, one GET
each. Here a shard file goes up as parts from a small thread pool while the writer fills the
next part (memory: at most `concurrency + 1` parts), and a rank's items come back in a few
large ranged GETs of neighbouring items, several at once (RangeReader). Files below one
part are a single PUT, as before. An upload that fails or is abandoned is aborted, so no
object and no pending upload is left behind: a shard exists whole or not at all.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

PART_BYTES = 16 << 20  # S3's minimum part is 5 MiB; its maximum count 10,000
_PARTS_PER_SIZE = 1000  # the part size doubles every 1,000 parts: no file hits the limit


class ParallelUpload:
    """A write-only stream to one S3 object, uploaded in parallel parts.

    Args:
        fs: an s3fs filesystem.
        path: "bucket/key".
        part_bytes: the first parts' size (PART_BYTES by default).
        concurrency: parts in flight at once (s3fs's max_concurrency by default).
    """

    def __init__(self, fs, path: str, *, part_bytes: int | None = None,
                 concurrency: int | None = None) -> None:
        self.fs = fs
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_bytes = part_bytes or PART_BYTES
        concurrency = concurrency or getattr(fs, "max_concurrency", 8)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="s3-part")
        self._slots = threading.BoundedSemaphore(concurrency)
        self._buffer = bytearray()
        self._written = 0
        self._upload_id: str | None = None
        self._parts: list[Future] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self.closed = False
        self._completed = False

    def _call(self, method: str, **kwargs):
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def write(self, data) -> int:
        if self.closed:
            raise ValueError(f"write to a closed upload of {self.path}")
        view = memoryview(data).cast("B")
        written = view.nbytes
        self._written += written
        while view.nbytes:
            size = self._next_part_size()
            take = min(size - len(self._buffer), view.nbytes)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == size:
                self._submit()
        return written

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        """Parts go up as they fill; close() sends the rest."""

    def _next_part_size(self) -> int:
        return self.part_bytes << (len(self._parts) // _PARTS_PER_SIZE)

    def _submit(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
        for part in self._parts:  # an earlier part failed: stop filling more
            if part.done() and part.exception() is not None:
                raise part.exception()
        body, self._buffer = self._buffer, bytearray()
        self._slots.acquire()  # at most `concurrency` parts are held in flight
        self._parts.append(self._pool.submit(self._upload_part, len(self._parts) + 1, body))

    def _upload_part(self, number: int, body: bytearray) -> dict:
        with self._count_lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            out = self._call("upload_part", PartNumber=number, UploadId=self._upload_id,
                             Body=body)
            return {"PartNumber": number, "ETag": out["ETag"]}
        finally:
            with self._count_lock:
                self._in_flight -= 1
            self._slots.release()

    def close(self) -> None:
        """Send what is left and complete the object (one PUT if it is smaller than a part).
        A second call does nothing (DCP closes the stream, and so does its context)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._upload_id is None:
                self._call("put_object", Body=self._buffer)
            else:
                if self._buffer:
                    self._submit()
                parts = [part.result() for part in self._parts]
                self._call("complete_multipart_upload", UploadId=self._upload_id,
                           MultipartUpload={"Parts": parts})
            self._completed = True
            self.fs.invalidate_cache(self.path)
        except BaseException:
            self.abort()
            raise
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Drop the upload: S3 keeps no object and no pending parts (an object already
        completed, when the writer fails after closing it, is deleted)."""
        self.closed = True
        if self._completed:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
            return
        for part in self._parts:
            part.cancel()
        self._pool.shutdown(wait=True)
        if self._upload_id is not None:
            try:
                self._call("abort_multipart_upload", UploadId=self._upload_id)
            except Exception:  # the bucket's lifecycle rule cleans up what this cannot
                pass
            self._upload_id = None


RANGE_BYTES = 16 << 20  # one GET covers neighbouring items up to this many bytes
RANGES_IN_FLIGHT = 4  # GETs at once ahead of the reader (memory: this many ranges)


class RangeReader:
    """The items of S3 objects, fetched as a few large ranged GETs ahead of the reader.

    A rank reads hundreds of items (one tensor each), most of them small: one GET per item
    pays the object store's latency hundreds of times in turn. Here neighbouring items of one
    object are read together, up to `range_bytes` per GET (an item larger than that in a GET
    of its own), `in_flight` GETs at once and ahead of the items being taken; a range is
    dropped as soon as its last item is taken.

    Args:
        fs: an s3fs filesystem.
        items: (path, offset, length) in the order they will be taken.
    """

    def __init__(self, fs, items: list[tuple[str, int, int]], *,
                 range_bytes: int | None = None, in_flight: int = RANGES_IN_FLIGHT) -> None:
        range_bytes = range_bytes or RANGE_BYTES
        self._fs = fs
        self._ranges: list[list] = []  # [path, start, end, items left]
        self._where: dict[tuple[str, int], int] = {}
        for path, offset, length in items:
            last = self._ranges[-1] if self._ranges else None
            if (last is not None and last[0] == path and last[1] <= offset
                    and offset + length - last[1] <= range_bytes):
                last[2] = max(last[2], offset + length)
                last[3] += 1
            else:
                self._ranges.append([path, offset, offset + length, 1])
            self._where[(path, offset)] = len(self._ranges) - 1
        self._in_flight = in_flight
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix="range-get")
        self._fetched: dict[int, Future] = {}
        self._submitted = 0

    def take(self, path: str, offset: int, length: int):
        """The `length` bytes at `offset` of `path` (bytes or a memoryview of a range)."""
        index = self._where[(path, offset)]
        while self._submitted < min(len(self._ranges), index + self._in_flight):
            name, start, end, _ = self._ranges[self._submitted]
            self._fetched[self._submitted] = self._pool.submit(
                self._fs.cat_file, name, start=start, end=end)
            self._submitted += 1
        name, start, end, left = self._ranges[index]
        data = self._fetched[index].result()
        self._ranges[index][3] = left - 1
        if left == 1:
            del self._fetched[index]
        if start == offset and end == offset + length:
            return data
        return memoryview(data)[offset - start:offset - start + length]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._fetched.clear()
