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


def test_checkpoints_on_s3_resume_exactly(s3, tiny_dataset, tmp_path):
    """The checkpoint folder on s3://: shards go straight to the bucket (async), a run stopped
    after step 10 resumes bitwise; storage options never reach the checkpoint."""
    import fsspec

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    base = {**BASE_OVERRIDES, "data.path": tiny_dataset, "training.steps": "20",
            "checkpoint.enable": "true", "checkpoint.interval": "10",
            "checkpoint.folder": f"{s3}/ckpt", "checkpoint.async_mode": "async",
            "checkpoint.storage_options": f"endpoint_url={endpoint}"}
    full = run_torchrun(2, base, tmp_path / "full")
    fs = fsspec.filesystem("s3")
    run_dir = f"{s3}/ckpt/raytitan"
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(run_dir)) == ["step-10", "step-20"]
    config = fs.cat_file(f"{run_dir}/step-10/run_config.toml").decode()
    assert endpoint not in config and "endpoint_url=<redacted>" in config

    fs.rm_file(f"{run_dir}/step-20/COMMIT.json")  # as if the run stopped after step 10
    resumed = run_torchrun(2, base, tmp_path / "full")
    assert resumed == full
