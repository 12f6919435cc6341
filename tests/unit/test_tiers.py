"""The fast tier, time-based cadence, transient-error retries and elastic sizes, in one
process (the multi-process paths: tests/distributed/test_recovery.py, test_elastic.py)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from raytitan.checkpoint import CheckpointError, fast
from raytitan.checkpoint.fast import replica_targets
from raytitan.checkpoint.retry import is_transient, with_retries
from raytitan.config import ConfigError, build_job_config
from raytitan.config.job_config import Checkpoint as CheckpointConfig
from tests.unit.test_checkpoint import Run, same

pytestmark = pytest.mark.usefixtures("world_of_one")


def fast_run(tmp_path, **cfg) -> Run:
    return Run(tmp_path / "ckpt", interval=1000, non_persistent_save_interval=1,
               non_persistent_local_ckpt_dir=str(tmp_path / "fast"), **cfg)


@pytest.mark.parametrize(("kind", "mode"), [("local", "disabled"), ("local", "async"),
                                            ("in_memory", "disabled"), ("in_memory", "async")])
def test_fast_tier_step_is_resumed_when_newest(tmp_path, kind, mode, caplog):
    run = fast_run(tmp_path, async_mode=mode, non_persistent_ckpt_type=kind)
    for _ in range(3):
        run.step()
    run.ckpt.save(3)  # persistent
    run.ckpt.poll(wait=True)
    run.step()
    run.step()
    run.ckpt.save_fast(5)
    run.ckpt.poll(wait=True)
    weights, rng = run.weights(), torch.get_rng_state()
    opt = run.opt.state_dict()["state"][0]["exp_avg"].clone()
    run.step()
    torch.manual_seed(99)

    resumed = fast_run(tmp_path, async_mode=mode, seed=5, non_persistent_ckpt_type=kind)
    with caplog.at_level(logging.INFO, logger="raytitan"):
        result = resumed.ckpt.load()
    assert result.step == 5 and result.path.startswith("fast tier")
    assert "resumed from the FAST TIER, step 5" in caplog.text
    assert "its newest step is 3" in caplog.text
    assert same(resumed.weights(), weights)
    assert torch.equal(resumed.opt.state_dict()["state"][0]["exp_avg"], opt)
    assert resumed.train_state.value == 5 and resumed.dataloader.value == 40
    assert torch.equal(torch.get_rng_state(), rng)


def test_in_memory_step_is_the_tensors_bytes_copied_once_and_taken_only_by_in_memory(
        tmp_path, caplog):
    """in_memory writes no torch.save file: each tensor's bytes lie verbatim in a mapped
    file, written before the next optimizer step (in the background thread, which that
    step waits for), and nothing is cloned first; a run of another fast-tier type does not
    read it."""
    run = fast_run(tmp_path, async_mode="async", non_persistent_ckpt_type="in_memory")
    run.step()
    clones = []
    real_clone = torch.Tensor.clone
    torch.Tensor.clone = lambda self, *a, **k: clones.append(self.shape) or real_clone(self, *a, **k)
    try:
        run.ckpt.save_fast(1)
        run.ckpt.wait_for_staging()  # the copy into the file is done
    finally:
        torch.Tensor.clone = real_clone
    weight = run.model[0].weight.detach().clone()
    run.step()  # changes the weights while the commit may still run: the file must not
    run.ckpt.poll(wait=True)
    assert clones == []
    step_dir = os.path.join(run.ckpt.fast.dir, "step-1")
    assert sorted(os.listdir(step_dir)) == ["COMPLETE.json", "rank-0.raw"]
    raw = open(os.path.join(step_dir, "rank-0.raw"), "rb").read()
    assert raw.startswith(fast.RAW_MAGIC)
    assert weight.numpy().tobytes() in raw  # verbatim
    run.ckpt.close()

    with caplog.at_level(logging.INFO, logger="raytitan"):
        assert fast_run(tmp_path).ckpt.load() is None  # a `local` run: not its format
    assert "saved with non_persistent_ckpt_type in_memory" in caplog.text
    with open(os.path.join(tmp_path / "bad.raw"), "wb") as f:
        f.write(b"PK\x03\x04" + bytes(60))
    with pytest.raises(CheckpointError, match="not an in_memory fast-tier file"):
        fast._read_raw(torch.from_file(str(tmp_path / "bad.raw"), size=64, dtype=torch.uint8))


@pytest.mark.parametrize("kind", ["local", "in_memory"])
def test_the_optimizer_waits_for_the_fast_tier_copy(tmp_path, monkeypatch, kind):
    """With a background thread the fast tier copies the state there, while the next
    forward/backward run; slowed down here, the copy must still see the step being saved,
    not what the next optimizer step writes (wait_for_staging before optimizer.step)."""
    import time

    stage = fast.FastTier._stage

    def slow_stage(self, step, state):
        time.sleep(1.0)
        return stage(self, step, state)

    monkeypatch.setattr(fast.FastTier, "_stage", slow_stage)
    run = fast_run(tmp_path, async_mode="async", non_persistent_ckpt_type=kind)
    for _ in range(2):
        run.step()
    saved, exp_avg = run.weights(), run.opt.state_dict()["state"][0]["exp_avg"].clone()
    run.ckpt.save_fast(2)
    assert run.ckpt.last_stall_sec < 0.5  # the copy is not in the training thread
    run.step()  # forward/backward overlap the copy; the update waits for it
    assert not same(run.weights(), saved)
    assert run.ckpt.fast.last_stall_sec >= 0.5  # ... and that wait counts as stall
    run.ckpt.close()
    resumed = fast_run(tmp_path, async_mode="async", seed=5, non_persistent_ckpt_type=kind)
    assert resumed.ckpt.load().step == 2
    assert same(resumed.weights(), saved)
    assert torch.equal(resumed.opt.state_dict()["state"][0]["exp_avg"], exp_avg)


def test_persistent_step_wins_when_as_new(tmp_path, caplog):
    run = fast_run(tmp_path)
    run.step()
    run.ckpt.save_fast(1)
    run.step()
    run.ckpt.save(2)
    run.ckpt.poll(wait=True)
    resumed = fast_run(tmp_path)
    with caplog.at_level(logging.INFO, logger="raytitan"):
        assert resumed.ckpt.load().step == 2
    assert "persistent step 2 is at least as new as fast-tier step 1" in caplog.text
    assert not any(n.startswith("step-") for n in os.listdir(resumed.ckpt.fast.dir))


def test_fast_step_of_another_run_or_mesh_is_not_used(tmp_path, caplog):
    run = fast_run(tmp_path)
    run.step()
    run.ckpt.save_fast(1)
    run.ckpt.close()
    marker = os.path.join(run.ckpt.fast.dir, "step-1", "COMPLETE.json")
    saved = json.load(open(marker))
    for change, why in (({"lineage": "someone-else"}, "belongs to another run"),
                        ({"world_size": 8, "mesh": {"dp_shard": 8}}, "was saved on mesh")):
        json.dump({**saved, **change}, open(marker, "w"))
        fresh = fast_run(tmp_path)
        with caplog.at_level(logging.INFO, logger="raytitan"):
            assert fresh.ckpt.load() is None  # nothing persistent: a fresh start
        assert why in caplog.text and "using the persistent tier" in caplog.text
        fresh.ckpt.close()
        os.makedirs(os.path.dirname(marker), exist_ok=True)  # cleaned: put it back
        json.dump({**saved, **change}, open(marker, "w"))
        torch.save({}, os.path.join(os.path.dirname(marker), "rank-0.pt"))


def test_incomplete_fast_step_is_not_used(tmp_path):
    run = fast_run(tmp_path)
    run.step()
    run.ckpt.save_fast(1)
    run.ckpt.close()
    os.remove(os.path.join(run.ckpt.fast.dir, "step-1", "COMPLETE.json"))
    assert fast_run(tmp_path).ckpt.load() is None


def test_time_based_cadence(tmp_path):
    run = Run(tmp_path / "c", interval=1000, interval_seconds=30.0,
              non_persistent_interval_seconds=5.0,
              non_persistent_local_ckpt_dir=str(tmp_path / "fast"))
    assert run.ckpt.save_due(1, 100) is None
    run.ckpt.fast.last_save_time -= 6
    assert run.ckpt.save_due(2, 100) == "fast"
    run.ckpt.last_save_time -= 31
    assert run.ckpt.save_due(3, 100) == "persistent"
    assert run.ckpt.save_due(100, 100) == "persistent"  # the last step


def test_replica_targets_land_on_other_nodes():
    nodes = ["a", "a", "b", "b"]
    assert replica_targets(nodes, 2, 0) == {0: [2], 1: [3], 2: [0], 3: [1]}
    with pytest.raises(CheckpointError, match="replication_jump = 1: rank 0 .* not on 1 other"):
        replica_targets(nodes, 2, 1)
    with pytest.raises(CheckpointError, match="replication_factor = 3 needs that many nodes"):
        replica_targets(nodes, 3, 0)
    assert replica_targets(["a", "b", "c"], 3, 0) == {0: [1, 2], 1: [2, 0], 2: [0, 1]}


def test_transient_errors_are_retried_and_others_are_not(monkeypatch, caplog):
    clock = [0.0]  # sleeping advances a fake clock
    monkeypatch.setattr("raytitan.checkpoint.retry.time.sleep",
                        lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr("raytitan.checkpoint.retry.time.monotonic", lambda: clock[0])
    assert is_transient(ConnectionResetError(104, "reset"))
    assert is_transient(OSError("An error occurred (SlowDown) when calling PutObject"))
    assert is_transient(RuntimeError("wrapped").with_traceback(None)) is False
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = TimeoutError()
    assert is_transient(wrapped)
    assert not is_transient(FileNotFoundError("no bucket"))
    assert not is_transient(PermissionError("denied"))

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "refused")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="raytitan"):
        assert with_retries(flaky, "writing x", 60) == "ok"
    assert len(calls) == 3 and "attempt 2 failed, retrying in 1.0 s" in caplog.text

    def down():
        raise ConnectionRefusedError(111, "refused")

    with pytest.raises(ConnectionRefusedError) as failed:
        with_retries(down, "writing y", 5)
    assert "writing y: gave up after 4 attempts over 3.5 s" in "".join(failed.value.__notes__)

    def missing():
        calls.append(1)
        raise FileNotFoundError("bucket")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, "z", 60)
    assert len(calls) == 1


def test_fast_tier_and_elastic_config_errors():
    with pytest.raises(ConfigError, match="replication_factor = 1 must be >= 2"):
        CheckpointConfig(replication_factor=1)
    with pytest.raises(ConfigError, match="needs checkpoint.non_persistent_global_ckpt_dir"):
        CheckpointConfig(non_persistent_save_interval=5, non_persistent_ckpt_type="global")
    with pytest.raises(ConfigError, match="non_persistent_ckpt_type = 'shm' is not valid; choose one of"):
        CheckpointConfig(non_persistent_ckpt_type="shm")
    with pytest.raises(ConfigError, match="ray.min_workers = 5 must be between 0"):
        build_job_config({"ray": {"num_workers": 4, "min_workers": 5}})
    with pytest.raises(ConfigError, match="ray.worker_resources entry 'slot' is not name="):
        build_job_config({"ray": {"worker_resources": ["slot"]}})


def test_elastic_sizes_must_all_fit_the_mesh():
    from raytitan.launcher import elastic_sizes

    ok = build_job_config({"ray": {"num_workers": 4, "min_workers": 2},
                           "training": {"global_batch_size": 24, "local_batch_size": 2}})
    assert elastic_sizes(ok) == (2, 4)
    odd = build_job_config({"ray": {"num_workers": 4, "min_workers": 1},
                            "training": {"global_batch_size": 8, "local_batch_size": 2}})
    with pytest.raises(ConfigError, match=r"but \[3\] do not fit this job .* fit: \[1, 2, 4\]; "
                                          r"use ray.min_workers = 4"):
        elastic_sizes(odd)


@pytest.mark.parametrize(("kind", "mode"), [("local", "async"), ("in_memory", "disabled")])
def test_non_finite_weights_are_never_kept_by_the_fast_tier(tmp_path, kind, mode, caplog):
    """The fast tier's copy checks the weights (off the training thread when async): a step
    with a NaN weight is logged as failed and not kept; the newest good step stays."""
    run = fast_run(tmp_path, async_mode=mode, non_persistent_ckpt_type=kind)
    run.step()
    run.ckpt.save_fast(1)
    run.ckpt.poll(wait=True)
    run.step()
    with torch.no_grad():
        next(run.model.parameters())[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="raytitan"):
        run.ckpt.save_fast(2)
        run.ckpt.poll(wait=True)
    assert "fast-tier save of step 2 failed" in caplog.text
    assert "non-finite (NaN/inf) weights" in caplog.text
    assert run.ckpt.fast.last_complete == 1
    assert not os.path.exists(os.path.join(run.ckpt.fast._step_dir(2), fast.COMPLETE))
