"""The training token stream: a deterministic global sample order, cut per DP rank.

Samples are `seq_len + 1` consecutive tokens of one shard (documents packed with EOS, the
tail of each shard dropped). The order of epoch e is a pure function of (seed, e): shards
in a seeded permutation, samples within a shard in a seeded permutation. Optimizer step k
consumes global positions [k*G, (k+1)*G) of that order (G = global batch size); DP rank r
takes the r-th of D equal slices. So the global batch of a step does not depend on D, and the
whole position is one integer, `samples_consumed`: it re-splits onto any DP degree.

Shards are read through a `ReadShards` function, so the same stream runs on pyarrow
(torchrun) or on Ray Data (`ray_io.read_shards_ray`); resuming opens the reader at the shard
that holds the position, without reading the consumed ones.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from raytitan.data.prepare import Manifest

# Given shard URLs in order, yields (url, all int32 tokens of that shard) for each.
ReadShards = Callable[[list[str]], Iterator[tuple[str, np.ndarray]]]


def read_shards_local(urls: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Read shards one by one with pyarrow (local disk or any fsspec filesystem)."""
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        column = pq.read_table(path, columns=["tokens"], filesystem=fs)["tokens"]
        yield url, pc.list_flatten(column).to_numpy()


class _Prefetch:
    """Pulls the next `depth` items of an iterator in a background thread, so reading the
    next shard overlaps training (and a reader's start-up overlaps model building)."""

    _END = object()

    def __init__(self, it: Iterator, depth: int = 1) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self._thread.start()

    def close(self, *, wait: bool = False) -> None:
        """Stop reading ahead: the thread exits after its current item and closes the
        underlying iterator. `wait`: until it has (so no reader outlives training)."""
        self._stop.set()
        # Unblock a pending put. NOTE: puts block without a timeout on purpose: a thread
        # that polls wakes up for the GIL and slowed training steps by ~8% (measured).
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        if wait:
            self._thread.join(timeout=120)

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                self._queue.put((item, None))
                if self._stop.is_set():
                    return
            self._queue.put((self._END, None))
        except BaseException as e:  # re-raised in the consumer
            if not self._stop.is_set():
                self._queue.put((None, e))
        finally:
            if hasattr(it, "close"):
                it.close()  # a generator: releases its reader (a Ray Data execution)

    def __iter__(self) -> _Prefetch:
        return self

    def __next__(self):
        item, error = self._queue.get()
        if error is not None:
            raise error
        if item is self._END:
            raise StopIteration
        return item


@dataclass
class Batch:
    tokens: torch.Tensor
    """[n, seq_len + 1] int64: this rank's samples of one optimizer step."""
    sample_ids: torch.Tensor
    """[n] int64: each sample's id (shard base + index in shard), unique within an epoch."""


@dataclass
class _LoadedShard:
    epoch: int
    start: int  # position within the epoch of this shard's first sample
    samples: np.ndarray  # [n, seq_len + 1], already in the epoch's order
    ids: np.ndarray  # [n]


class TokenStream:
    """Per-DP-rank iterator of optimizer-step batches with a resumable global position."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        seq_len: int,
        seed: int,
        dp_rank: int,
        dp_degree: int,
        global_batch_size: int,
        read_shards: ReadShards = read_shards_local,
    ) -> None:
        if global_batch_size % dp_degree:
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by dp degree {dp_degree}"
            )
        self.manifest = manifest
        self.sample_len = seq_len + 1
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.global_batch_size = global_batch_size
        self.read_shards = read_shards
        self.samples_per_shard = np.array(
            [s.num_tokens // self.sample_len for s in manifest.shards], dtype=np.int64
        )
        self.samples_per_epoch = int(self.samples_per_shard.sum())
        if self.samples_per_epoch == 0:
            raise ValueError(
                f"dataset {manifest.root!r} has {manifest.num_tokens} tokens: not one sample of "
                f"seq_len + 1 = {self.sample_len} tokens fits in any shard"
            )
        self._shard_base = np.concatenate([[0], np.cumsum(self.samples_per_shard)[:-1]])
        self.samples_consumed = 0
        self._loaded: _LoadedShard | None = None
        self._reader: _Prefetch | None = None
        self._reader_next: tuple[int, int] | None = None  # (epoch, order index) it yields next

    # -- position -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """The global position (identical on every rank) and what it is only valid for."""
        return {
            "samples_consumed": self.samples_consumed,
            "sample_len": self.sample_len,
            "samples_per_epoch": self.samples_per_epoch,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("sample_len", "samples_per_epoch", "seed"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"data position was saved with {key} = {int(state[key])}, but this run has "
                    f"{key} = {getattr(self, key)}: the sample order differs, so the position "
                    "cannot be resumed (keep seq_len, seed and dataset, or exclude the data "
                    "state from loading)"
                )
        self.samples_consumed = int(state["samples_consumed"])
        self._close_reader()
        self._loaded = None

    def _close_reader(self, *, wait: bool = False) -> None:
        if self._reader is not None:
            self._reader.close(wait=wait)
        self._reader, self._reader_next = None, None

    def close(self) -> None:
        """Stop the background reader and wait for it to finish (end of training)."""
        self._close_reader(wait=True)

    def start(self) -> None:
        """Open the reader at the current position now (in the background), instead of at
        the first `next_batch`."""
        self._locate_reader(*divmod(self.samples_consumed, self.samples_per_epoch))

    @property
    def epoch(self) -> int:
        return self.samples_consumed // self.samples_per_epoch

    # -- batches ------------------------------------------------------------------------

    def next_batch(self) -> Batch:
        """This rank's samples of the next optimizer step; advances the global position."""
        per_rank = self.global_batch_size // self.dp_degree
        first = self.samples_consumed + self.dp_rank * per_rank
        rows, ids = [], []
        for pos in range(first, first + per_rank):
            shard, index = self._locate(pos)
            rows.append(shard.samples[index])
            ids.append(shard.ids[index])
        self.samples_consumed += self.global_batch_size
        return Batch(
            tokens=torch.from_numpy(np.stack(rows).astype(np.int64)),
            sample_ids=torch.from_numpy(np.array(ids, dtype=np.int64)),
        )

    def _locate(self, pos: int) -> tuple[_LoadedShard, int]:
        epoch, offset = divmod(pos, self.samples_per_epoch)
        shard = self._loaded
        if shard is None or shard.epoch != epoch or not (
            shard.start <= offset < shard.start + len(shard.samples)
        ):
            shard = self._load(epoch, offset)
        return shard, offset - shard.start

    def _shard_order(self, epoch: int) -> np.ndarray:
        # Shards without a whole sample are left out of the order.
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples_per_shard))
        return order[self.samples_per_shard[order] > 0]

    def _locate_reader(self, epoch: int, offset: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Shard order and ends of `epoch`, the index k of the shard holding `offset`, and a
        reader positioned to yield shard k next."""
        order = self._shard_order(epoch)
        ends = np.cumsum(self.samples_per_shard[order])
        k = int(np.searchsorted(ends, offset, side="right"))
        if self._reader_next != (epoch, k):
            # Open a reader at shard k: the shards before it are never read.
            self._close_reader()
            self._reader = _Prefetch(self._shards_from(epoch, k))
            self._reader_next = (epoch, k)
        return order, ends, k

    def _shards_from(self, epoch: int, k: int) -> Iterator[tuple[str, np.ndarray]]:
        """Shards in stream order from shard k of `epoch` on, through all later epochs (so
        the prefetch runs across epoch boundaries too)."""
        while True:
            urls = [self.manifest.shard_url(int(s)) for s in self._shard_order(epoch)[k:]]
            yield from self.read_shards(urls)
            epoch, k = epoch + 1, 0

    def _load(self, epoch: int, offset: int) -> _LoadedShard:
        order, ends, k = self._locate_reader(epoch, offset)
        url, tokens = next(self._reader)
        shard_id = int(order[k])
        expected = self.manifest.shard_url(shard_id)
        if url.rstrip("/").rsplit("/", 1)[-1] != expected.rsplit("/", 1)[-1]:
            raise RuntimeError(f"shard reader returned {url} where {expected} was expected")
        self._reader_next = (epoch, k + 1) if k + 1 < len(order) else (epoch + 1, 0)
        n = int(self.samples_per_shard[shard_id])
        perm = np.random.default_rng([self.seed, epoch, shard_id]).permutation(n)
        samples = tokens[: n * self.sample_len].reshape(n, self.sample_len)[perm]
        ids = self._shard_base[shard_id] + perm
        start = int(ends[k] - n)
        self._loaded = _LoadedShard(epoch, start, samples, ids)
        return self._loaded
