"""Trainer features, each against the plain single-process run of conftest.BASE_OVERRIDES.

These check numerics only; that activation checkpointing, compile and bf16 are applied at all
is checked on the workers by test_placements.py (equal losses pass with a feature off)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import BASE_OVERRIDES, run_torchrun


@pytest.fixture(scope="module")
def base(tiny_dataset):
    return {**BASE_OVERRIDES, "data.path": tiny_dataset}


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    dump = tmp_path_factory.mktemp("ref")
    losses = run_torchrun(1, {**base, "metrics.enable_tensorboard": "true"}, dump)
    return dump, losses


def test_metrics_jsonl_and_tensorboard(reference):
    dump, losses = reference
    records = [json.loads(line) for line in open(dump / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 11))
    for r in records:
        for key in ("loss", "grad_norm", "lr", "tokens_per_sec", "data_wait_sec",
                    "memory_gib", "step_time_sec"):
            assert isinstance(r[key], float), key
    assert records[1]["lr"] == pytest.approx(3e-4)  # end of the 2-step warm-up
    assert losses[-1] < losses[0] - 0.1
    assert list((dump / "tb" / "raytitan").glob("events.out.tfevents.*"))


@pytest.mark.slow  # 38 s; CI: every bitwise resume test compares with an uninterrupted run
def test_two_runs_are_bitwise_identical(reference, base, tmp_path):
    """Losses, and the RNG state each rank saves (the process RNGs are seeded too)."""
    saved = {**base, "checkpoint.enable": "true"}
    assert run_torchrun(2, saved, tmp_path / "a") == run_torchrun(2, saved, tmp_path / "b")
    assert run_torchrun(1, base, tmp_path / "c") == reference[1]
    rng = [saved_rng(tmp_path / run / "checkpoint" / "raytitan" / "step-10") for run in "ab"]
    assert set(rng[0]) == {"rank0", "rank1"}
    assert not torch.equal(rng[0]["rank0"]["torch"], rng[0]["rank1"]["torch"])  # per rank
    for rank in rng[0]:
        assert torch.equal(rng[0][rank]["torch"], rng[1][rank]["torch"]), rank
        assert rng[0][rank]["python"] == rng[1][rank]["python"], rank


def saved_rng(step_dir) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(step_dir), str(step_dir.parent / "full.pt"))
    return torch.load(step_dir.parent / "full.pt", weights_only=False)["rng"]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_losses(mode, reference, base, tmp_path):
    losses = run_torchrun(1, {**base, "activation_checkpoint.mode": mode}, tmp_path)
    assert losses == reference[1]


def test_gradient_accumulation_matches_one_big_batch(reference, base, tmp_path):
    # Reference: 4 micro-steps of 2 samples. Here: 1 micro-step of 8 (same samples).
    losses = run_torchrun(1, {**base, "training.local_batch_size": "8"}, tmp_path)
    for got, want in zip(losses, reference[1]):
        assert got == pytest.approx(want, rel=1e-5)


def test_bf16_mixed_precision_fsdp_trains(base, tmp_path):
    losses = run_torchrun(2, {**base, "training.mixed_precision_param": "bfloat16",
                              "training.lr": "3e-3"}, tmp_path)
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.slow
def test_compiled_blocks_with_tp_match(reference, base, tmp_path):
    losses = run_torchrun(2, {**base, "compile.enable": "true",
                              "parallelism.tensor_parallel_degree": "2"}, tmp_path, timeout=900)
    for got, want in zip(losses, reference[1]):
        assert got == pytest.approx(want, rel=1e-4)
