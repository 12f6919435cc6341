"""Data on s3:// (a moto S3 server on 127.0.0.1, started here): prepare reads and writes
through fsspec, and training streams shards from the bucket with the same tokens as local."""

from __future__ import annotations

import os

import pytest

from tests.conftest import (
    BASE_OVERRIDES,
    free_port,
    last_run_log,
    overrides_to_argv,
    run_torchrun,
)


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


@pytest.mark.parametrize("mode", [
    pytest.param("async", marks=pytest.mark.slow),  # pinned (in CI) covers the same path
    "async_with_pinned_mem",
])
def test_checkpoints_on_s3_resume_exactly(s3, tiny_dataset, tmp_path, mode):
    """The checkpoint folder on s3://: shards go straight to the bucket (from a thread, or
    from the persist process), a run stopped after step 10 resumes bitwise; storage options
    never reach the checkpoint."""
    import fsspec

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    base = {**BASE_OVERRIDES, "data.path": tiny_dataset, "training.steps": "20",
            "checkpoint.enable": "true", "checkpoint.interval": "10",
            "checkpoint.folder": f"{s3}/ckpt-{mode}", "checkpoint.async_mode": mode,
            "checkpoint.storage_options": f"endpoint_url={endpoint}"}
    full = run_torchrun(2, base, tmp_path / "full")
    fs = fsspec.filesystem("s3")
    run_dir = f"{s3}/ckpt-{mode}/raytitan"
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(run_dir)) == [
        "LEASE.json", "RUN.json", "step-10", "step-20"]
    config = fs.cat_file(f"{run_dir}/step-10/run_config.toml").decode()
    assert endpoint not in config and "endpoint_url=<redacted>" in config

    from raytitan.checkpoint import inspect

    assert "committed *" in inspect.ls(run_dir, [])
    assert "train_state: {'step': 10, " in inspect.show(f"{run_dir}/step-10", [])
    assert inspect.verify(f"{run_dir}/step-10", [])[0]

    fs.rm_file(f"{run_dir}/step-20/COMMIT.json")  # as if the run stopped after step 10
    assert not inspect.verify(f"{run_dir}/step-20", [])[0]
    resumed = run_torchrun(2, base, tmp_path / "full")
    assert resumed == full
    assert f"resumed from {run_dir}/step-10: step 10" in last_run_log(tmp_path / "full")


def test_a_missing_bucket_is_refused_before_training(s3, tiny_dataset, tmp_path):
    """A typo in the bucket (or an emptied account) is an error, never a fresh start in a
    bucket created on the fly: under torchrun and in the launcher, before Ray starts."""
    import fsspec

    from raytitan.checkpoint import CheckpointError
    from raytitan.config import load_job_config
    from raytitan.launcher import launch

    overrides = {**BASE_OVERRIDES, "data.path": tiny_dataset, "checkpoint.enable": "true",
                 "checkpoint.folder": "s3://no-such-bucket/ckpt"}
    with pytest.raises(AssertionError, match="bucket 'no-such-bucket' does not exist"):
        run_torchrun(2, overrides, tmp_path, read=False)
    cfg = load_job_config(None, overrides_to_argv({**overrides,
                                                   "job.dump_folder": str(tmp_path)}))
    with pytest.raises(CheckpointError, match="raytitan never creates buckets"):
        launch(cfg)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert not fs.exists("no-such-bucket")
    assert not (tmp_path / "metrics.jsonl").exists()  # no step was trained


def test_ray_registers_and_retains_checkpoints_on_s3(s3, tiny_dataset, tmp_path):
    """Under Ray the s3:// folder is the Ray run directory: committed steps are registered
    without re-upload, and Ray's retention (keep_latest_k) deletes old ones in the bucket."""
    import subprocess
    import sys

    import fsspec

    from tests.conftest import ROOT, overrides_to_argv
    from tests.integration.test_ray import RAY_ENV

    overrides = {**BASE_OVERRIDES, "data.path": tiny_dataset, "training.steps": "6",
                 "checkpoint.enable": "true", "checkpoint.interval": "3",
                 "checkpoint.keep_latest_k": "1", "checkpoint.folder": f"{s3}/ray",
                 "job.dump_folder": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "raytitan.cli", "train",
                           *overrides_to_argv(overrides)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, **RAY_ENV})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[1] for p in fs.ls(f"{s3}/ray/raytitan")}
    assert "step-6" in names and "step-3" not in names  # Ray deleted the older one
    assert "checkpoint_manager_snapshot.json" in names  # Ray's own run state, same folder
    assert fs.exists(f"{s3}/ray/raytitan/step-6/COMMIT.json")


def test_hf_and_torch_exports_to_and_from_s3(s3, tiny_dataset, tmp_path):
    """last_save_in_hf into an s3:// step (written locally, then uploaded, covered by the
    commit); `convert to-hf` / `to-torch` from an s3:// step to s3:// give the same bytes."""
    import fsspec
    import torch
    import transformers

    from raytitan.checkpoint import inspect
    from raytitan.cli import main as cli_main

    base = {**BASE_OVERRIDES, "data.path": tiny_dataset, "training.steps": "3",
            "checkpoint.enable": "true", "checkpoint.interval": "3",
            "checkpoint.folder": f"{s3}/hf-run", "checkpoint.last_save_in_hf": "true"}
    run_torchrun(1, base, tmp_path / "run", read=False)
    step = f"{s3}/hf-run/raytitan/step-3"
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    ok, message = inspect.verify(step, [])
    assert ok and "hf/config.json" in fs.cat_file(f"{step}/COMMIT.json").decode(), message

    for argv in (["to-hf", step, f"{s3}/exported"], ["to-torch", step, f"{s3}/model.pt"]):
        try:
            cli_main(["convert", *argv])
        except SystemExit as e:
            assert e.code == 0, argv
    fs.invalidate_cache()
    fs.get(f"{step}/hf/", str(tmp_path / "in_step"), recursive=True)
    fs.get(f"{s3}/exported/", str(tmp_path / "exported"), recursive=True)
    names = sorted(p.name for p in (tmp_path / "exported").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "in_step").iterdir())
    assert "model.safetensors.index.json" in names and "tokenizer.json" in names
    for name in names:
        assert (tmp_path / "exported" / name).read_bytes() == \
            (tmp_path / "in_step" / name).read_bytes(), name
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    fs.get(f"{s3}/model.pt", str(tmp_path / "model.pt"))
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(state["norm.weight"], model.model.norm.weight.detach())


def test_s3_outage_during_saves_is_retried(s3, tiny_dataset, tmp_path):
    """The run talks to S3 through a proxy that drops every connection for 6 s when step 4's
    save is being prepared (rank 0 writes its SAVING.json, training waits) and again when
    step 6's shard is being written in the background (botocore's own retries off): both
    retry with backoff, the run finishes, and every interval step is committed and
    verifies. The outages start on the request itself, not on a clock."""
    import subprocess
    import sys

    import fsspec

    from raytitan.checkpoint import inspect
    from tests.conftest import ROOT
    from tests.tcp_proxy import FlakyProxy

    proxy = FlakyProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    endpoint = f"http://127.0.0.1:{proxy.port}"
    folder = f"{s3}/outage"
    run = {**BASE_OVERRIDES, "data.path": tiny_dataset, "training.steps": "16",
           "checkpoint.enable": "true", "checkpoint.interval": "2",
           "checkpoint.async_mode": "async", "checkpoint.folder": folder,
           "checkpoint.storage_options": f"endpoint_url={endpoint}",
           "job.dump_folder": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "raytitan.train",
           *overrides_to_argv(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AWS_MAX_ATTEMPTS": "1",
           "AWS_ENDPOINT_URL": endpoint, "RAYTITAN_SLOW_STEP_SEC": "0.3",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fault_hooks"), str(ROOT)])}
    fs = fsspec.filesystem("s3")  # straight to moto, not through the proxy
    proxy.outage_on(b"step-4/SAVING.json", 6.0)
    proxy.outage_on(b"step-6/__0_0.distcp", 6.0)
    try:
        with open(tmp_path / "run.log", "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
            assert proc.wait(timeout=240) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        proxy.close()
    assert proxy.dropped >= 2 and not proxy.armed, (proxy.dropped, proxy.armed)
    log = (tmp_path / "run.log").read_text()
    assert "transient storage error during preparing" in log, log[-3000:]
    assert "transient storage error during writing shards to" in log, log[-3000:]
    fs.invalidate_cache()
    for step in range(2, 17, 2):
        ok, message = inspect.verify(f"{folder}/raytitan/step-{step}", [])
        assert ok, message


def test_the_lease_reads_while_its_heartbeat_rewrites_it(s3):
    """The lease on S3 is read (check() before every commit, on every rank) while the
    heartbeat thread rewrites it: every read sees a whole lease, never an error (s3fs's
    open() + read() fails with FileExpired when the object changed in between)."""
    import threading

    from raytitan.checkpoint.lease import FolderLease
    from raytitan.checkpoint.storage import CheckpointStorage

    storage = CheckpointStorage(f"{s3}/lease-race/raytitan")
    lease = FolderLease(storage, job="race", timeout=60)
    lease.acquire()
    stop = threading.Event()

    def rewrite() -> None:
        while not stop.is_set():
            lease._write()

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(150):
            assert lease.read()["holder"] == lease.holder
            lease.check()
    finally:
        stop.set()
        writer.join()
        lease.release()


def test_shard_files_go_up_as_parallel_parts_and_items_come_back_in_few_gets(s3, monkeypatch):
    """A DCP save through StepWriter to s3://: each shard file goes up as a multipart upload
    with several parts in flight at once; the checksummed load reads neighbouring items
    together in a few ranged GETs (not one per item, not s3fs's read-ahead blocks), several
    at once; the state comes back bitwise, and a flipped byte in a small item is caught."""
    import json
    import threading
    import time

    import fsspec
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from raytitan.checkpoint import objectstore
    from raytitan.checkpoint.shards import StepWriter, step_reader

    monkeypatch.setattr(objectstore, "PART_BYTES", 5 << 20)  # S3's smallest part
    monkeypatch.setattr(objectstore, "RANGE_BYTES", 1 << 20)
    uploads: list[objectstore.ParallelUpload] = []
    close = objectstore.ParallelUpload.close

    def recording_close(self):
        if self not in uploads:  # DCP closes the stream, then the context does
            uploads.append(self)
        close(self)

    monkeypatch.setattr(objectstore.ParallelUpload, "close", recording_close)
    fs = fsspec.filesystem("s3")  # the instance StepReader gets (fsspec caches it)
    in_flight, most, gets = 0, 0, 0
    lock = threading.Lock()
    cat_file = fs.cat_file

    def counting_cat_file(path, *args, **kwargs):
        nonlocal in_flight, most, gets
        if not path.endswith(".distcp"):
            return cat_file(path, *args, **kwargs)
        with lock:
            gets, in_flight = gets + 1, in_flight + 1
            most = max(most, in_flight)
        try:
            time.sleep(0.2)
            return cat_file(path, *args, **kwargs)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(fs, "cat_file", counting_cat_file)
    torch.manual_seed(0)
    # 16 MiB (a range of its own) and 40 small tensors of 2 KiB (a few 1 MiB ranges)
    state = {"w": torch.randn(4 << 20), **{f"s{i}": torch.randn(512) for i in range(40)}}
    url = f"{s3}/parallel/step-1"
    dcp.save(state, storage_writer=StepWriter(url, storage_options={}, checksums=True),
             no_dist=True)
    shard = [u for u in uploads if u.path.endswith(".distcp")]
    assert len(shard) == 1 and shard[0].max_in_flight >= 2, [u.max_in_flight for u in shard]
    checksums = fs.cat_file(f"{url}/checksums.json")
    items = {name: entry[2] for name, entry in json.loads(checksums).items()}

    def load() -> tuple[dict, object]:
        loaded = {k: torch.zeros_like(v) for k, v in state.items()}
        reader = step_reader(url, {}, items, threads=2)
        dcp.load(loaded, storage_reader=reader, no_dist=True)
        return loaded, reader

    loaded, reader = load()
    assert reader.checked_items == 41 and 2 <= gets <= 3 and most >= 2, (
        reader.checked_items, gets, most)
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    (name, offsets), = items.items()  # one shard file: flip a byte inside the smallest item
    offset, (length, _) = min(offsets.items(), key=lambda kv: kv[1][0])
    path = f"{url}/{name}"
    data = bytearray(cat_file(path))
    data[int(offset) + length - 1] ^= 1
    fs.pipe_file(path, bytes(data))
    with pytest.raises(CheckpointException, match="do not match the CRC32"):
        load()


def test_a_failed_upload_leaves_no_object_and_no_pending_parts(s3):
    import fsspec

    from raytitan.checkpoint.objectstore import ParallelUpload

    fs = fsspec.filesystem("s3")
    path = f"{s3}/aborted/__0_0.distcp"
    upload = ParallelUpload(fs, path, part_bytes=5 << 20)
    upload.write(os.urandom(12 << 20))  # two parts sent, one buffered
    upload.abort()
    fs.invalidate_cache()
    assert not fs.exists(path)
    bucket = s3.removeprefix("s3://")
    pending = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert not [u for u in pending if u["Key"].startswith("aborted/")], pending
