"""Ray: the launcher's TorchTrainer run gives the same losses as torchrun, and the Ray Data
prepare pipeline and shard reader give the same tokens as the local ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.conftest import BASE_OVERRIDES, ROOT, overrides_to_argv, read_losses, run_torchrun

# Keep every Ray process on loopback (PLATFORM.md) and off any cluster in the environment.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": ""}


@pytest.fixture(scope="module")
def local_ray():
    os.environ.update(RAY_ENV)
    import ray

    ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # CI: test_worker_killed_... compares a Ray run with torchrun bitwise
def test_ray_launch_matches_torchrun(tiny_dataset, tmp_path):
    overrides = {**BASE_OVERRIDES, "data.path": tiny_dataset, "ray.num_workers": "2",
                 "job.name": "ray-vs-torchrun"}
    torchrun_losses = run_torchrun(2, overrides, tmp_path / "torchrun")
    ray_dump = tmp_path / "ray"
    cmd = [sys.executable, "-m", "raytitan.cli", "train",
           *overrides_to_argv({**overrides, "job.dump_folder": str(ray_dump)})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, **RAY_ENV})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert read_losses(ray_dump) == torchrun_losses  # bitwise: same floats
    # Ray's run directory is the checkpoint folder's <job.name>: <dump>/checkpoint/<name>
    assert (ray_dump / "checkpoint" / "ray-vs-torchrun").is_dir()


def test_prepare_ray_equals_prepare_local(local_ray, tiny_dataset, tmp_path):
    from raytitan.data.prepare import Manifest
    from raytitan.data.ray_io import prepare_ray

    local = Manifest.load(tiny_dataset)
    corpus = os.path.join(os.path.dirname(tiny_dataset), "corpus.jsonl")
    out = str(tmp_path / "ray-prepared")
    prepare_ray(corpus, out, tokenizer_path=tiny_dataset, shard_tokens=16384)
    via_ray = Manifest.load(out)
    assert via_ray == local
    for i in range(len(local.shards)):
        assert pq.read_table(via_ray.shard_url(i)).equals(pq.read_table(local.shard_url(i)))
    with open(os.path.join(out, "tokenizer.json")) as a, \
            open(os.path.join(tiny_dataset, "tokenizer.json")) as b:
        assert json.load(a) == json.load(b)


def test_ray_data_reader_streams_shards_in_order(local_ray, tiny_dataset):
    from raytitan.data.prepare import Manifest
    from raytitan.data.ray_io import read_shards_ray
    from raytitan.data.stream import read_shards_local

    manifest = Manifest.load(tiny_dataset)
    urls = [manifest.shard_url(i) for i in (3, 0, 2)]  # any order the stream asks for
    got = list(read_shards_ray(urls))
    want = list(read_shards_local(urls))
    assert [u for u, _ in got] == urls
    for (_, a), (_, b) in zip(got, want):
        assert (a == b).all()
