"""The fast tier under torchrun (gloo, CPU): a killed worker resumes from its own node, a
lost (fake) node from its peers' replicas, both bitwise equal to an uninterrupted run and
without reading persistent storage; SIGTERM saves a step and the resumed run repeats none.
docs/checkpointing.md "Tiers"."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    BASE_OVERRIDES,
    ROOT,
    free_port,
    last_run_log,
    overrides_to_argv,
    read_losses,
    run_torchrun,
)

RUN_DIR = "checkpoint/raytitan"


@pytest.fixture(scope="module")
def base(tiny_dataset):
    # Persistent saves only at the last step: recovery mid-run has the fast tier alone.
    return {**BASE_OVERRIDES, "data.path": tiny_dataset, "checkpoint.enable": "true",
            "checkpoint.interval": "1000", "checkpoint.non_persistent_save_interval": "3"}


def fast_dir(tmp_path) -> str:
    return str(tmp_path / "fast")


@pytest.fixture(scope="module")
def reference_dp2(base, tmp_path_factory):
    """Uninterrupted, fast tier on: every recovery below must match these losses bitwise."""
    dump = tmp_path_factory.mktemp("ref_dp2")
    return run_torchrun(2, {**base, "checkpoint.non_persistent_local_ckpt_dir":
                            str(dump / "fast")}, dump)


def persistent_reads(log: str) -> list[str]:
    return re.findall(r"checkpoint: loaded \[.*\] of (\S+)", log)


def test_killed_worker_resumes_from_its_own_node(base, reference_dp2, tmp_path):
    """Rank 1 is SIGKILLed as step 8 starts; torchrun restarts both ranks, which resume from
    fast-tier step 6 (saved synchronously here) on their own node: bitwise, no persistent
    read."""
    run = {**base, "checkpoint.non_persistent_local_ckpt_dir": fast_dir(tmp_path)}
    losses = run_torchrun(2, run, tmp_path, env={"RAYTITAN_KILL_AT": "1:8"}, max_restarts=1)
    log = last_run_log(tmp_path)
    assert "resumed from the FAST TIER, step 6" in log, log[-3000:]
    assert "every rank from its own node" in log
    assert persistent_reads(log) == []
    assert losses == reference_dp2


def test_warm_restart_resumes_in_the_same_torchrun_attempt(base, reference_dp2, tmp_path):
    """training.warm_restarts = 1, torchrun allows no restart: rank 1's trainer is SIGKILLed
    as step 8 starts while rank 0's sleeps outside any collective (it would not notice);
    rank 0's keeper ends it, both keepers fork new trainers (generation 1) that meet in a
    new process group and resume from fast-tier step 6: bitwise, no persistent read, all in
    torchrun's first attempt."""
    run = {**base, "checkpoint.non_persistent_local_ckpt_dir": fast_dir(tmp_path),
           "checkpoint.non_persistent_ckpt_type": "in_memory", "training.warm_restarts": "1"}
    losses = run_torchrun(2, run, tmp_path, timeout=200, max_restarts=0,
                          env={"RAYTITAN_KILL_AT": "1:8", "RAYTITAN_STALL_AT": "0:8"})
    log = last_run_log(tmp_path)
    assert "rank 1: its trainer exited with -9" in log, log[-3000:]
    assert "rank 0: rank 1's trainer failed" in log
    assert log.count(": warm restart 1 of 1") == 2
    assert "resumed from the FAST TIER, step 6" in log
    assert persistent_reads(log) == []
    assert losses == reference_dp2


def test_lost_node_resumes_from_peer_replicas(base, tiny_dataset, tmp_path_factory):
    """Two fake nodes of one rank each, tensor parallel 2 (the norms are replicated over TP,
    so fully_parallel writes them on rank 0 only), the in_memory type (raw bytes, no
    torch.save), replication on, background saves. Rank 1 dies with its node's folder as
    step 9 starts: its state comes from its replica on rank 0, bitwise, without reading
    persistent storage."""
    run = {**base, "parallelism.tensor_parallel_degree": "2",
           "parallelism.data_parallel_shard_degree": "1", "checkpoint.async_mode": "async",
           "checkpoint.replication": "true", "checkpoint.non_persistent_ckpt_type": "in_memory"}
    env = {"RAYTITAN_FAKE_RANKS_PER_NODE": "1"}
    ref = tmp_path_factory.mktemp("ref_tp2")
    expected = run_torchrun(2, {**run, "checkpoint.non_persistent_local_ckpt_dir":
                                str(ref / "fast")}, ref, env=env)
    dump = tmp_path_factory.mktemp("lost_node")
    local = dump / "fast"
    node1 = next(iter(os.listdir(ref / "fast")))[:-1] + "1"  # <host>-fake1
    losses = run_torchrun(2, {**run, "checkpoint.non_persistent_local_ckpt_dir": str(local)},
                          dump, env={**env, "RAYTITAN_KILL_AT": f"1:9:{local / node1}"},
                          max_restarts=1)
    log = last_run_log(dump)
    assert re.search(r"resumed from the FAST TIER, step [36] .*ranks \[1\] from peer "
                     r"replicas \(rank 1: replica on rank 0", log), log[-3000:]
    assert persistent_reads(log) == []
    assert losses == expected
    # Each node holds its own rank's file and its peer's replica of the newest step only.
    for node in os.listdir(local):
        steps = os.listdir(local / node)
        assert len(steps) == 1, steps
        assert sorted(os.listdir(local / node / steps[0])) == [
            "COMPLETE.json", "rank-0.raw", "rank-1.raw"]


@pytest.mark.parametrize("warm_restarts", ["0", pytest.param("1", marks=pytest.mark.slow)])
def test_sigterm_saves_a_step_and_the_resumed_run_repeats_none(base, reference_dp2,
                                                               tmp_path, warm_restarts):
    """SIGTERM to the torchrun agent between saves: every rank finishes its step, the step
    is committed to persistent storage (one node: the fast tier would die with it), the
    ranks exit; the resumed run starts at the next step and ends bitwise equal. With warm
    restarts the keepers pass the signal on to their trainers once, and restart nothing."""
    run = {**base, "training.steps": "10", "checkpoint.non_persistent_local_ckpt_dir":
           fast_dir(tmp_path), "job.dump_folder": str(tmp_path),
           "training.warm_restarts": warm_restarts}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "raytitan.train",
           *overrides_to_argv(run)]
    # Slow steps (a test hook) leave time to signal between saves.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYTITAN_SLOW_STEP_SEC": "0.5",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fault_hooks"), str(ROOT)])}
    with open(tmp_path / "a.log", "w") as out:
        agent = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
            assert agent.poll() is None and time.time() < deadline, \
                (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.05)
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    log = (tmp_path / "a.log").read_text()
    saved = re.search(r"step (\d+): preemption notice: emergency save to (\S+)", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert 4 <= step < 10 and saved.group(2).endswith(f"step-{step}")
    assert (tmp_path / RUN_DIR / f"step-{step}" / "COMMIT.json").exists()
    assert len(read_losses(tmp_path)) == step  # nothing trained past the save
    assert "warm restart" not in log

    losses = run_torchrun(2, run, tmp_path)
    resumed = last_run_log(tmp_path)
    assert f"training steps {step + 1}..10" in resumed, resumed[-3000:]
    assert losses == reference_dp2
    commit = json.loads((tmp_path / RUN_DIR / f"step-{step}" / "COMMIT.json").read_text())
    assert commit["step"] == step
