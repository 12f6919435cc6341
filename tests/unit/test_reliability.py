"""The fault suite, in one process (docs/reliability.md): each test is a fault that lost data
or trained on wrong state before, and must not now. Items refer to issue 9's list."""

from __future__ import annotations

import errno
import json
import logging
import pickle
import shutil

import pytest
import torch

from raytitan.checkpoint import CheckpointError
from raytitan.checkpoint.folder import check_folder_hosts
from raytitan.checkpoint.lease import LEASE_FILE, FolderLease
from raytitan.checkpoint.shards import StepWriter
from raytitan.checkpoint.storage import COMMIT_FILE, CheckpointStorage
from raytitan.config import ConfigError, JobConfig, to_dict
from raytitan.resume import check_resume_config
from tests.unit.test_checkpoint import Run, same

pytestmark = pytest.mark.usefixtures("world_of_one")


def three_steps(tmp_path) -> Run:
    run = Run(tmp_path)
    for _ in range(3):
        run.train_and_save(1)
    return run


def shard_bytes(step_dir) -> bytes:
    return (step_dir / "__0_0.distcp").read_bytes()


# -- 1. a damaged manifest never deletes a step -------------------------------------------


@pytest.mark.parametrize("damage", ["torn", "other step"])
def test_damaged_newest_manifest_falls_back_loudly_and_keeps_the_step(tmp_path, caplog, damage):
    run = three_steps(tmp_path)
    step3 = tmp_path / "step-3"
    shards = shard_bytes(step3)
    commit = step3 / COMMIT_FILE
    commit.write_text('{"step": 3, "fi' if damage == "torn"
                      else commit.read_text().replace('"step": 3', '"step": 2'))
    with caplog.at_level(logging.WARNING, logger="raytitan"):
        resumed = Run(tmp_path, seed=4)
        assert resumed.ckpt.load().step == 2
    assert "RESUMING FROM THE OLDER step-2" in caplog.text and "step-3 (damaged" in caplog.text
    assert shard_bytes(step3) == shards  # not deleted, not touched
    resumed.train_and_save(1)  # a new step-3 moves the damaged one aside
    [moved] = (tmp_path / "quarantine").iterdir()
    assert shard_bytes(moved) == shards
    del run


def test_every_manifest_damaged_refuses_to_start_over_them(tmp_path):
    three_steps(tmp_path)
    for step in (1, 2, 3):
        (tmp_path / f"step-{step}" / COMMIT_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="Refusing to start from scratch"):
        Run(tmp_path).ckpt.load()
    assert all((tmp_path / f"step-{s}" / "__0_0.distcp").exists() for s in (1, 2, 3))


def test_only_this_runs_own_interrupted_save_is_deleted(tmp_path, caplog):
    run = three_steps(tmp_path)
    shutil.copytree(tmp_path / "step-3", tmp_path / "step-5")  # as a save cut before COMMIT
    (tmp_path / "step-5" / COMMIT_FILE).unlink()
    intent = json.loads((tmp_path / "step-5" / "SAVING.json").read_text())
    (tmp_path / "step-5" / "SAVING.json").write_text(json.dumps({**intent, "step": 5}))
    shutil.copytree(tmp_path / "step-5", tmp_path / "step-7")  # ... and one nobody claims
    (tmp_path / "step-7" / "SAVING.json").unlink()
    with caplog.at_level(logging.WARNING, logger="raytitan"):
        assert Run(tmp_path).ckpt.load().step == 3
    assert not (tmp_path / "step-5").exists()
    assert (tmp_path / "step-7" / "__0_0.distcp").exists()
    assert "step-7 (unknown" in caplog.text and "NOT deleted" in caplog.text
    del run


# -- 2. a run owns its folder -------------------------------------------------------------


def test_a_second_live_writer_is_refused_and_a_stale_lease_taken_over(tmp_path):
    storage = CheckpointStorage(str(tmp_path))
    first = FolderLease(storage, job="a", timeout=60, holder="run-a")
    first.acquire()
    with pytest.raises(CheckpointError, match=r"in use by run run-a \(job a"):
        FolderLease(storage, job="b", timeout=60, holder="run-b").acquire()
    first.release()
    second = FolderLease(storage, job="b", timeout=60, holder="run-b")
    second.acquire()  # released: free
    lease = json.loads((tmp_path / LEASE_FILE).read_text())
    lease.update(heartbeat=lease["heartbeat"] - 120, pid=2**22 + 7)  # dead and silent
    (tmp_path / LEASE_FILE).write_text(json.dumps(lease))
    third = FolderLease(storage, job="c", timeout=60, holder="run-c")
    third.acquire()
    with pytest.raises(CheckpointError, match="lost the lease.*run-c"):
        second.check()
    third.release()


def test_a_run_that_lost_its_lease_stops_saving(tmp_path):
    run = Run(tmp_path)
    run.train_and_save(1)
    lease = json.loads((tmp_path / LEASE_FILE).read_text())  # taken over by someone else
    (tmp_path / LEASE_FILE).write_text(json.dumps({**lease, "holder": "someone-else"}))
    with pytest.raises(CheckpointError, match="lost the lease.*someone-else"):
        run.train_and_save(1)
    assert not (tmp_path / "step-2").exists()  # it wrote nothing


def test_another_runs_step_is_never_resumed_implicitly(tmp_path, caplog):
    mine = three_steps(tmp_path / "mine")
    theirs = Run(tmp_path / "theirs", seed=3)
    for _ in range(5):
        theirs.train_and_save(1)  # higher sequence numbers
    shutil.copytree(tmp_path / "theirs" / "step-5", tmp_path / "mine" / "step-5")
    with caplog.at_level(logging.WARNING, logger="raytitan"):
        resumed = Run(tmp_path / "mine", seed=9)
        assert resumed.ckpt.load().step == 3
    assert same(resumed.weights(), mine.weights())
    assert "resumed only when named (--checkpoint.load_step 5)" in caplog.text
    named = Run(tmp_path / "mine", seed=9, load_step=5)
    assert named.ckpt.load().step == 5 and same(named.weights(), theirs.weights())
    assert json.loads((tmp_path / "mine" / "step-5" / COMMIT_FILE).read_text())["lineage"] \
        != json.loads((tmp_path / "mine" / "step-3" / COMMIT_FILE).read_text())["lineage"]


# -- 3. silent corruption is caught by default --------------------------------------------


def item_offset(step_dir, fqn_prefix: str) -> tuple[int, int]:
    metadata = pickle.loads((step_dir / ".metadata").read_bytes())
    for index, info in metadata.storage_data.items():
        if index.fqn.startswith(fqn_prefix):
            return info.offset, info.length
    raise KeyError(fqn_prefix)


@pytest.mark.parametrize(("key", "flip"), [("model.", 8), ("dataloader.", 1)])
def test_a_flipped_byte_fails_the_load_naming_file_and_key(tmp_path, key, flip):
    run = Run(tmp_path)
    run.train_and_save(1)
    step = tmp_path / "step-1"
    offset, length = item_offset(step, key)
    data = bytearray(shard_bytes(step))
    for i in range(flip):
        data[offset + length - 1 - i] ^= 0x5A  # the payload end, not the pickle header
    (step / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"step-1 is damaged.*__0_0.distcp.*\({key}"):
        Run(tmp_path).ckpt.load()


# -- 5. NaN is never committed ------------------------------------------------------------


def test_non_finite_weights_are_never_saved(tmp_path):
    run = Run(tmp_path, keep_latest_k=1)
    run.train_and_save(1)
    with torch.no_grad():
        next(run.model.parameters())[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite.*not saved"):
        run.train_and_save(1)
    assert run.storage.committed_steps() == [1]  # the good step was not rotated out


# -- 6. storage errors name errno, path and the last committed step ------------------------


def test_disk_full_names_enospc_and_the_last_good_step(tmp_path, monkeypatch):
    run = Run(tmp_path)
    run.train_and_save(1)

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "step-2"))

    monkeypatch.setattr(StepWriter, "write_data", full)
    with pytest.raises(CheckpointError) as e:
        run.train_and_save(1)
    message = str(e.value)
    assert "ENOSPC" in message and "step-2" in message and message.endswith("step-1")


# -- 7. a resume names every changed hyper-parameter ---------------------------------------


def saved_config(**training) -> dict:
    cfg = to_dict(JobConfig())
    cfg["training"].update(training)
    return cfg


def test_resume_logs_changed_hyperparameters_and_refuses_another_model(caplog):
    cfg = JobConfig()
    with caplog.at_level(logging.INFO, logger="raytitan"):
        check_resume_config(cfg, saved=saved_config(lr=1e-3, steps=50), commit={"step": 10},
                            world_size=2)
    assert "training.lr = 0.0003, but step-10 was trained with 0.001" in caplog.text
    assert "training.steps = 10000" in caplog.text
    other = saved_config()
    other["model"]["flavor"] = "1B"
    with pytest.raises(ConfigError, match="model.flavor = 'debug'.*'1B'"):
        check_resume_config(cfg, saved=other, commit={"step": 10}, world_size=2)


def test_minus_one_global_batch_keeps_the_checkpoints_on_fewer_ranks():
    cfg = JobConfig()  # local_batch_size 8, global -1
    kept = check_resume_config(cfg, saved=None, commit={"step": 4, "global_batch_size": 16},
                               world_size=1)
    assert kept.training.global_batch_size == 16  # not 8: two accumulation steps
    with pytest.raises(ConfigError, match="global batch of 12.*not a multiple"):
        check_resume_config(cfg, saved=None, commit={"step": 4, "global_batch_size": 12},
                            world_size=1)


# -- 8. multi-node ------------------------------------------------------------------------


def test_a_node_local_folder_is_refused_on_several_nodes(tmp_path):
    storage = CheckpointStorage(str(tmp_path))
    with pytest.raises(CheckpointError, match="local path, but this run spans 2 nodes"):
        check_folder_hosts(storage, ["a", "a", "b", "b"], shared=False)
    check_folder_hosts(storage, ["a", "a", "b", "b"], shared=True)
    check_folder_hosts(storage, ["a", "a"], shared=False)


def test_commit_checks_every_listed_file_exists(tmp_path, monkeypatch):
    """As on a multi-node run with a node-local folder: rank 0 cannot see another's shard."""
    run = Run(tmp_path)
    original = StepWriter.finish

    def lose_shard(self, metadata, results):
        original(self, metadata, results)
        (tmp_path / "step-1" / "__0_0.distcp").unlink()

    monkeypatch.setattr(StepWriter, "finish", lose_shard)
    with pytest.raises(CheckpointError, match=r"step-1 is not committed: __0_0.distcp is missing"):
        run.train_and_save(1)
    assert not (tmp_path / "step-1" / COMMIT_FILE).exists()


# -- the staging wait ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "async_with_pinned_mem"])
def test_the_optimizer_waits_for_the_background_copy(tmp_path, monkeypatch, mode):
    """Both async modes copy the state in a background thread while training goes on;
    slowed down here, the copy must still see the weights of the step being saved, not the
    ones the next optimizer step writes (Trainer.train_step calls wait_for_staging)."""
    import time

    from torch.distributed.checkpoint.staging import DefaultStager

    copy = DefaultStager._stage

    def slow_copy(self, state_dict, **kwargs):
        time.sleep(1.0)
        return copy(self, state_dict, **kwargs)

    monkeypatch.setattr(DefaultStager, "_stage", slow_copy)
    run = Run(tmp_path, async_mode=mode)
    for _ in range(3):
        run.step()
    saved = run.weights()
    run.ckpt.save(3)
    run.step()  # forward/backward overlap the copy; the update waits for it
    assert not same(run.weights(), saved)
    run.ckpt.close()
    resumed = Run(tmp_path, seed=5)
    assert resumed.ckpt.load().step == 3
    assert same(resumed.weights(), saved)
