"""Data: prepare output, the deterministic global order, DP-independent batches, and exact
resume of the position (also onto another DP degree) without re-reading consumed shards."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raytitan.data.prepare import Manifest, prepare_local
from raytitan.data.stream import TokenStream, read_shards_local
from raytitan.data.tokenizer import EOS


def make_stream(manifest, dp_rank=0, dp_degree=1, global_batch=8, seed=0, reader=None,
                seq_len=64):
    return TokenStream(manifest, seq_len=seq_len, seed=seed, dp_rank=dp_rank,
                       dp_degree=dp_degree, global_batch_size=global_batch,
                       read_shards=reader or read_shards_local)


def global_ids(manifest, dp_degree, steps, **kw):
    """Sample ids of each step, concatenated over DP ranks in rank order."""
    streams = [make_stream(manifest, r, dp_degree, **kw) for r in range(dp_degree)]
    return [torch.cat([s.next_batch().sample_ids for s in streams]).tolist()
            for _ in range(steps)]


@pytest.fixture(scope="module")
def manifest(tiny_dataset):
    return Manifest.load(tiny_dataset)


def test_prepare_writes_shards_tokenizer_and_manifest(manifest, tiny_dataset):
    assert len(manifest.shards) > 3
    assert manifest.vocab_size == 512
    total = 0
    for i, shard in enumerate(manifest.shards):
        table = pq.read_table(manifest.shard_url(i))
        assert table.num_rows == shard.num_docs
        docs = table["tokens"].to_pylist()
        assert all(doc[-1] == manifest.eos_id for doc in docs)  # EOS ends every document
        total += sum(map(len, docs))
    assert total == manifest.num_tokens
    with open(f"{tiny_dataset}/tokenizer.json") as f:
        assert EOS in json.load(f)["model"]["vocab"]


def test_prepare_rejects_missing_and_empty_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no input files"):
        prepare_local(str(tmp_path / "nothing*.jsonl"), str(tmp_path / "out"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(FileNotFoundError, match="no input files"):
        prepare_local(str(tmp_path), str(tmp_path / "out"))


def test_samples_are_contiguous_token_windows(manifest):
    batch = make_stream(manifest).next_batch()
    assert batch.tokens.shape == (8, 65) and batch.tokens.dtype == torch.int64
    assert int(batch.tokens.max()) < manifest.vocab_size


def test_global_batch_does_not_depend_on_dp_degree(manifest):
    one = global_ids(manifest, 1, steps=12)
    assert global_ids(manifest, 2, steps=12) == one
    assert global_ids(manifest, 4, steps=12) == one
    # The order is shuffled (not shard order), and the seed changes it.
    assert one[0] != list(range(8))
    assert global_ids(manifest, 1, steps=12, seed=1) != one


def test_each_epoch_is_a_permutation_of_all_samples(manifest):
    stream = make_stream(manifest, global_batch=1)
    n = stream.samples_per_epoch
    epoch0 = [stream.next_batch().sample_ids.item() for _ in range(n)]
    epoch1 = [stream.next_batch().sample_ids.item() for _ in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1  # a new order each epoch
    assert stream.epoch == 2


def test_resume_continues_exactly_and_re_splits_onto_another_dp_degree(manifest):
    uninterrupted = global_ids(manifest, 1, steps=40)
    # Save from DP 2 after 15 steps (crossing epoch boundaries with this batch size).
    streams = [make_stream(manifest, r, 2) for r in range(2)]
    for _ in range(15):
        for s in streams:
            s.next_batch()
    state = streams[0].state_dict()
    assert state == streams[1].state_dict()  # one global position, same on every rank
    for dp in (1, 2, 4):
        resumed = [make_stream(manifest, r, dp) for r in range(dp)]
        for s in resumed:
            s.load_state_dict(state)
        after = [torch.cat([s.next_batch().sample_ids for s in resumed]).tolist()
                 for _ in range(25)]
        assert after == uninterrupted[15:], f"dp {dp}"


def test_resume_does_not_read_consumed_shards(manifest):
    requested = []

    def counting_reader(urls):
        requested.append(list(urls))
        return read_shards_local(urls)

    stream = make_stream(manifest, reader=counting_reader, global_batch=4)
    stream.samples_consumed = stream.samples_per_epoch - 4  # the last step of epoch 0
    stream.next_batch()
    order = stream._shard_order(0)
    last = manifest.shard_url(int(order[-1]))
    assert requested[0] == [last]  # (then the next epoch is read ahead)


def test_position_from_another_sample_order_is_rejected(manifest):
    state = make_stream(manifest).state_dict()
    with pytest.raises(ValueError, match="sample_len = 65, but this run has sample_len = 33"):
        make_stream(manifest, seq_len=32).load_state_dict(state)


def test_too_long_samples_are_rejected(manifest):
    with pytest.raises(ValueError, match="not one sample"):
        make_stream(manifest, seq_len=10**7)


def test_shard_tokens_match_manifest(manifest):
    for _, tokens in read_shards_local([manifest.shard_url(0)]):
        assert tokens.dtype == np.int32
        assert len(tokens) == manifest.shards[0].num_tokens


def test_prefetch_close_stops_the_thread_and_closes_the_reader():
    from raytitan.data.stream import _Prefetch

    closed = []

    def reader():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    prefetch = _Prefetch(reader())
    assert next(prefetch) == 0
    prefetch.close()
    prefetch._thread.join(timeout=5)
    assert not prefetch._thread.is_alive() and closed == [True]


def test_prefetch_reraises_reader_errors():
    from raytitan.data.stream import _Prefetch

    def reader():
        yield 1
        raise OSError("shard vanished")

    prefetch = _Prefetch(reader())
    assert next(prefetch) == 1
    with pytest.raises(OSError, match="shard vanished"):
        next(prefetch)
