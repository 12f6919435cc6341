"""Checkpoints of real training runs under torchrun (gloo, CPU): exact resume for each async
mode, resharding onto other meshes, the data position across DP degrees, seed checkpoints.

The reference is the debug job on 2 ranks with FSDP2, 20 steps, a checkpoint every 10."""

from __future__ import annotations

import json
import shutil
import tomllib

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from raytitan.config import load_job_config
from raytitan.data.prepare import Manifest
from raytitan.data.stream import TokenStream
from tests.conftest import BASE_OVERRIDES, last_run_log, overrides_to_argv, run_torchrun

STEP_DIR = "checkpoint/raytitan/step-{}"


@pytest.fixture(scope="module")
def base(tiny_dataset):
    return {**BASE_OVERRIDES, "data.path": tiny_dataset, "training.steps": "20",
            "checkpoint.enable": "true", "checkpoint.interval": "10"}


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    dump = tmp_path_factory.mktemp("reference")
    return dump, run_torchrun(2, base, dump)


def resume_from_reference(reference, tmp_path, nproc: int, overrides: dict) -> list[float]:
    """Copy the reference's checkpoints, resume from step 10, return all 20 losses."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    losses = run_torchrun(nproc, {**overrides, "checkpoint.load_step": "10"}, tmp_path)
    assert_resumed(tmp_path, 10, reference[0])
    return losses


def assert_resumed(dump, step: int, reference_dump=None) -> None:
    """The last run loaded `step` and trained only the steps after it (a run that loaded
    nothing would retrain from step 1, bitwise alike, and rewrite metrics.jsonl)."""
    log = last_run_log(dump)
    assert f"resumed from {dump / STEP_DIR.format(step)}: step {step}, " in log, log[-3000:]
    assert f"training steps {step + 1}.." in log
    if reference_dump is not None:  # the records of steps 1..step are the reference's own
        assert (dump / "metrics.jsonl").read_text().splitlines()[:step] == \
            (reference_dump / "metrics.jsonl").read_text().splitlines()[:step]


def test_resume_is_bitwise_exact(reference, base, tmp_path):
    assert len(reference[1]) == 20
    assert resume_from_reference(reference, tmp_path, 2, base) == reference[1]
    log = last_run_log(tmp_path)
    assert "dataloader, lr_scheduler, model, optimizer, rng, train_state loaded" in log


@pytest.mark.parametrize("mode", [
    # CI keeps the thread path through the s3-outage, fast-tier and recovery tests
    pytest.param("async", marks=pytest.mark.slow),
    "async_with_pinned_mem",
])
def test_async_save_is_exact_and_resumes_bitwise(mode, reference, base, tmp_path):
    overrides = {**base, "checkpoint.async_mode": mode}
    assert run_torchrun(2, overrides, tmp_path) == reference[1]  # the save did not perturb
    (tmp_path / STEP_DIR.format(20) / "COMMIT.json").unlink()  # as if cut before its commit
    assert run_torchrun(2, overrides, tmp_path) == reference[1]  # auto-resumes from step 10
    assert_resumed(tmp_path, 10)
    assert "step-20, this run's interrupted save" in last_run_log(tmp_path)


def test_step_dir_holds_config_and_tokenizer(reference, tiny_dataset):
    step = reference[0] / STEP_DIR.format(10)
    assert (step / "tokenizer" / "tokenizer.json").read_bytes() == \
        open(f"{tiny_dataset}/tokenizer.json", "rb").read()
    saved = tomllib.loads((step / "run_config.toml").read_text())
    assert saved["training"]["steps"] == 20 and saved["checkpoint"]["interval"] == 10
    assert load_job_config(str(step / "run_config.toml")).data.path == tiny_dataset


@pytest.mark.parametrize("mesh", [
    {"parallelism.tensor_parallel_degree": "2"},
    {"parallelism.pipeline_parallel_degree": "2"},
    "single process",
])
def test_resume_onto_another_mesh(mesh, reference, base, tmp_path):
    nproc = 1 if mesh == "single process" else 2
    overrides = {**base, **({} if nproc == 1 else mesh),
                 "checkpoint.save_tokenizer_assets": "false"}
    losses = resume_from_reference(reference, tmp_path, nproc, overrides)
    assert losses[:10] == reference[1][:10]
    for got, want in zip(losses[10:], reference[1][10:], strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    assert not (tmp_path / STEP_DIR.format(20) / "tokenizer").exists()


def test_data_position_re_splits_from_dp2_to_dp1(reference, tiny_dataset):
    """The position saved by the 2-rank run, loaded into a 1-rank stream, yields exactly the
    samples the 2 ranks would have taken next: none repeated, none skipped."""
    state = {"dataloader": {"samples_consumed": 0, "sample_len": 0, "samples_per_epoch": 0,
                            "seed": 0}}
    dcp.load(state, checkpoint_id=str(reference[0] / STEP_DIR.format(10)), no_dist=True)
    assert state["dataloader"]["samples_consumed"] == 10 * 8

    manifest = Manifest.load(tiny_dataset)

    def stream(rank: int, degree: int) -> TokenStream:
        return TokenStream(manifest, seq_len=64, seed=0, dp_rank=rank, dp_degree=degree,
                           global_batch_size=8)

    single = stream(0, 1)
    single.load_state_dict(state["dataloader"])
    pair = [stream(0, 2), stream(1, 2)]
    seen = set()
    for step in range(20):
        two = np.concatenate([s.next_batch().sample_ids.numpy() for s in pair])
        ids = set(two.tolist())
        if step < 10:
            seen |= ids
            continue
        one = single.next_batch().sample_ids.numpy()
        assert one.tolist() == two.tolist()
        assert not ids & seen
        seen |= ids


@pytest.mark.slow  # 37 s: four meshes
def test_seed_checkpoint_starts_every_mesh_from_the_same_weights(base, tmp_path):
    seed_run = tmp_path / "seed"
    run_torchrun(1, {**base, "checkpoint.create_seed_checkpoint": "true",
                     "training.seed": "1"}, seed_run, read=False)
    assert (seed_run / STEP_DIR.format(0) / "COMMIT.json").exists()
    one_step = {**base, "training.steps": "1"}
    plain = run_torchrun(1, one_step, tmp_path / "plain")[0]  # weights from seed 0
    first = []
    for i, (nproc, mesh) in enumerate([(1, {}), (2, {}),
                                       (2, {"parallelism.tensor_parallel_degree": "2"}),
                                       (2, {"parallelism.pipeline_parallel_degree": "2"})]):
        dump = tmp_path / f"mesh{i}"
        shutil.copytree(seed_run / "checkpoint", dump / "checkpoint")
        first.append(run_torchrun(nproc, {**one_step, **mesh}, dump)[0])
    assert all(loss == pytest.approx(first[0], rel=1e-6) for loss in first), first
    assert abs(first[0] - plain) > 1e-3  # the weights did come from the seed checkpoint


def test_seed_checkpoint_needs_one_process(base, tmp_path):
    with pytest.raises(AssertionError, match="world size of 1"):
        run_torchrun(2, {**base, "checkpoint.create_seed_checkpoint": "true"}, tmp_path,
                     read=False)


def test_bad_load_step_fails_before_training(reference, base, tmp_path):
    shutil.copytree(reference[0] / "checkpoint", tmp_path / "checkpoint")
    with pytest.raises(AssertionError, match=r"load_step = 15.*committed steps: \[10, 20\]"):
        run_torchrun(2, {**base, "checkpoint.load_step": "15"}, tmp_path, read=False)


def test_cli_form_of_exclude_from_loading(reference, base, tmp_path):
    """exclude_from_loading=lr_scheduler (CLI form a,b): the schedule restarts its warm-up."""
    argv = overrides_to_argv({"checkpoint.exclude_from_loading": "lr_scheduler,rng"})
    assert load_job_config(None, argv).checkpoint.exclude_from_loading == ["lr_scheduler", "rng"]
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    run_torchrun(2, {**base, "checkpoint.load_step": "10", "training.steps": "11",
                     "checkpoint.exclude_from_loading": "lr_scheduler,rng"}, tmp_path)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert records[-1]["step"] == 11
    assert records[-1]["lr"] == pytest.approx(3e-4 / 2)  # warm-up step 1 of 2


def test_last_save_in_hf_from_a_sharded_run(base, tmp_path):
    """FSDP2 x TP (2 x 2 ranks): the final step's hf/ folder holds the whole model (read
    back from the sharded save) and transformers computes raytitan's logits from it."""
    import torch
    import transformers

    from raytitan.interop.hf import model_entries, read_model_tensors
    from raytitan.models.llama3 import Llama3
    from raytitan.models.llama3.hf import flavor_args

    run_torchrun(4, {**base, "training.steps": "2", "checkpoint.interval": "2",
                     "parallelism.tensor_parallel_degree": "2",
                     "checkpoint.last_save_in_hf": "true"}, tmp_path, read=False)
    step = tmp_path / STEP_DIR.format(2)
    assert json.loads((step / "COMMIT.json").read_text())["mesh"]["dp_shard"] == 2
    entries = model_entries(str(step), {})
    weights = read_model_tensors(str(step), {}, entries, sorted(entries))
    vocab = weights["tok_embeddings.weight"].shape[0]
    ours = Llama3(flavor_args("debug", vocab))
    ours.load_state_dict(weights, strict=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(step / "hf", dtype=torch.float32)
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max() <= 1e-4


# -- Megatron's fully_parallel_save / fully_parallel_load (issue 11) ---------------------

HSDP = {"parallelism.data_parallel_replicate_degree": "2",
        "parallelism.data_parallel_shard_degree": "2"}


def shard_sizes(step_dir) -> list[int]:
    """Bytes each of the 4 ranks wrote (its DCP shard file, from checksums.json)."""
    files = json.loads((step_dir / "checksums.json").read_text())
    return [files[f"__{rank}_0.distcp"][0] for rank in range(4)]


def full_state(step_dir, out) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=False)


def assert_same_state(a, b, key: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), key
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), key
        for k in a:
            assert_same_state(a[k], b[k], f"{key}.{k}")
    else:
        assert a == b, key


@pytest.fixture(scope="module")
def hsdp_runs(base, tmp_path_factory):
    """The same 4-rank HSDP (2 replicas x 2 shards) run of 10 steps, saved at 5 and 10,
    with fully_parallel_save on (the default) and off."""
    runs = {}
    for balanced in ("true", "false"):
        dump = tmp_path_factory.mktemp(f"hsdp-balanced-{balanced}")
        overrides = {**base, **HSDP, "training.steps": "10", "checkpoint.interval": "5",
                     "checkpoint.fully_parallel_save": balanced}
        runs[balanced] = dump, run_torchrun(4, overrides, dump)
    return runs


def test_fully_parallel_save_balances_replicas_and_writes_the_same_state(hsdp_runs, tmp_path):
    (balanced, losses), (lowest, lowest_losses) = hsdp_runs["true"], hsdp_runs["false"]
    assert losses == lowest_losses
    sizes = shard_sizes(balanced / STEP_DIR.format(10))
    assert max(sizes) <= 1.10 * min(sizes), sizes  # balanced within 10%
    skewed = shard_sizes(lowest / STEP_DIR.format(10))
    assert max(skewed[2:]) < 0.05 * min(skewed[:2]), skewed  # replicas 2, 3 write ~nothing
    assert abs(sum(sizes) - sum(skewed)) < 0.01 * sum(sizes)  # every tensor written once
    assert_same_state(full_state(balanced / STEP_DIR.format(10), tmp_path / "a.pt"),
                      full_state(lowest / STEP_DIR.format(10), tmp_path / "b.pt"))


def test_fully_parallel_load_reads_each_replica_once_and_resumes_bitwise(hsdp_runs, base,
                                                                          tmp_path):
    dump, losses = hsdp_runs["true"]
    shutil.copytree(dump, tmp_path, dirs_exist_ok=True)
    overrides = {**base, **HSDP, "training.steps": "10", "checkpoint.interval": "5",
                 "checkpoint.load_step": "5", "checkpoint.fully_parallel_load": "true"}
    assert run_torchrun(4, overrides, tmp_path) == losses  # bitwise
    assert_resumed(tmp_path, 5, dump)
    log = last_run_log(tmp_path)
    read = json.loads(log.split("bytes read per rank: ", 1)[1].split("]", 1)[0] + "]")
    stored = sum(shard_sizes(tmp_path / STEP_DIR.format(5)))
    # Without it each rank reads its whole half of the state (~stored / 2); with it, a
    # quarter: each replicated tensor is read by one of its two replicas.
    assert max(read) < 0.3 * stored and sum(read) < 1.05 * stored, (read, stored)
    assert max(read) <= 1.15 * min(read), read
    assert "fully_parallel_load: " in log
