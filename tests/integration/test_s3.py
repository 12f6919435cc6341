"""Data on s3:// (a moto S3 server on 127.0.0.1, started here): prepare reads and writes
through fsspec, and training streams shards from the bucket with the same tokens as local."""

from __future__ import annotations

import os

from tests.conftest import BASE_OVERRIDES, run_torchrun


def test_prepare_and_stream_from_s3(s3, tiny_dataset, tmp_path):
    import fsspec

    from raytitan.data.prepare import Manifest, prepare_local
    from raytitan.data.stream import TokenStream

    corpus = os.path.join(os.path.dirname(tiny_dataset), "corpus.jsonl")
    fs = fsspec.filesystem("s3")
    fs.put(corpus, f"{s3}/raw/corpus.jsonl")
    out = f"{s3}/prepared"
    prepare_local(f"{s3}/raw/", out, tokenizer_path=f"{tiny_dataset}/tokenizer.json",
                  shard_tokens=16384)
    remote, local = Manifest.load(out), Manifest.load(tiny_dataset)
    assert remote == local

    def batches(manifest):
        stream = TokenStream(manifest, seq_len=64, seed=0, dp_rank=0, dp_degree=1,
                             global_batch_size=8)
        return [stream.next_batch().tokens for _ in range(30)]

    assert all((a == b).all() for a, b in zip(batches(remote), batches(local)))


def test_train_from_s3_matches_local(s3, tiny_dataset, tmp_path):
    import fsspec

    fsspec.filesystem("s3").put(tiny_dataset, f"{s3}/copy", recursive=True)
    base = {**BASE_OVERRIDES, "training.steps": "4"}
    local = run_torchrun(1, {**base, "data.path": tiny_dataset}, tmp_path / "local")
    remote = run_torchrun(1, {**base, "data.path": f"{s3}/copy"}, tmp_path / "s3")
    assert remote == local
