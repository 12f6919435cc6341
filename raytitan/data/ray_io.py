"""The Ray Data side of the data pipeline (imported by the launcher and CLI only, so the
Trainer stays free of Ray): distributed tokenization for `raytitan prepare`, and a shard
reader that streams prepared shards into a training worker through Ray Data."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data

from raytitan.data.prepare import (
    Manifest,
    ShardWriter,
    eos_id,
    finish,
    iter_documents,
    list_inputs,
    load_or_train_tokenizer,
    tokenize_texts,
)
from raytitan.data.stream import read_shards_local

logger = logging.getLogger(__name__)


def _ordered_context() -> None:
    # Rows must come out in file order: the sample order and the shard boundaries depend on it.
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False


def _read_documents(files: list[str], fmt: str) -> ray.data.Dataset:
    """A dataset with one `text` row per document, in file order."""
    if fmt == "jsonl":
        return ray.data.read_json(files, lines=True).select_columns(["text"])
    if fmt == "parquet":
        return ray.data.read_parquet(files, columns=["text"])
    return ray.data.read_binary_files(files).map_batches(
        lambda b: {"text": np.array([x.decode("utf-8") for x in b["bytes"]], dtype=object)},
        batch_format="numpy",
    )


class _Tokenize:
    """Ray Data map_batches callable: text -> tokens (+EOS). One tokenizer per actor/task."""

    def __init__(self, tok_json: str) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tok_json)
        self.eos = eos_id(self.tok)

    def __call__(self, batch: pa.Table) -> pa.Table:
        docs = tokenize_texts(self.tok, batch.column("text").to_pylist(), self.eos)
        return pa.table({"tokens": pa.array(docs, type=pa.list_(pa.int32()))})


def prepare_ray(
    input_path: str,
    output: str,
    *,
    tokenizer_path: str | None = None,
    vocab_size: int = 2048,
    shard_tokens: int = 32 * 2**20,
) -> Manifest:
    """Tokenize `input_path` with a Ray Data pipeline; the driver writes ordered shards."""
    _ordered_context()
    files, fmt = list_inputs(input_path)
    tok = load_or_train_tokenizer(tokenizer_path, lambda: iter_documents(files, fmt), vocab_size)
    tokenize = _Tokenize(tok.to_str())
    tokens = _read_documents(files, fmt).map_batches(
        lambda b: tokenize(b), batch_format="pyarrow", batch_size=256
    )
    writer = ShardWriter(output, shard_tokens)
    for batch in tokens.iter_batches(batch_format="pyarrow", batch_size=None):
        column = batch.column("tokens")
        writer.add(np.asarray(x, dtype=np.int32) for x in column.to_numpy(zero_copy_only=False))
    return finish(output, tok, writer.close(), input_path)


def _read_shard_batch(batch: pa.Table) -> pa.Table:
    """Ray Data task: read whole shards; one output row (url, all tokens) per shard."""
    urls = batch.column("url").to_pylist()
    tokens = [tokens for _, tokens in read_shards_local(urls)]
    return pa.table({"url": urls, "tokens": pa.array(tokens, type=pa.list_(pa.int32()))})


def read_shards_ray(urls: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """`ReadShards` on Ray Data: shards are read by Ray Data tasks (one block per shard,
    read ahead while this worker trains) and streamed into this process in order.

    NOTE: a dataset of shard URLs mapped by a reader task starts in ~0.2 s once warm;
    `read_parquet` over the same files spent ~10 s listing them per dataset (Ray 2.60)."""
    if not urls:
        return
    _ordered_context()
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    ds = ds.map_batches(_read_shard_batch, batch_format="pyarrow", batch_size=1)
    expected = iter(urls)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
        for url, tokens in zip(batch.column("url").to_pylist(), batch.column("tokens")):
            want = next(expected)
            if url != want:
                raise RuntimeError(f"Ray Data returned shard {url} where {want} was expected")
            yield url, tokens.values.to_numpy()
