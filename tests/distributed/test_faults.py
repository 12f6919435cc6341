"""The fault suite under torchrun (gloo, CPU; docs/reliability.md): two writers on one
folder, an agent killed under its ranks, a diverging run, a resume on fewer ranks."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    BASE_OVERRIDES,
    HOOKS,
    ROOT,
    free_port,
    last_run_log,
    overrides_to_argv,
    run_torchrun,
)
from tests.integration.test_checkpoint_ray import descendants

RUN_DIR = "checkpoint/raytitan"


@pytest.fixture(scope="module")
def base(tiny_dataset):
    return {**BASE_OVERRIDES, "data.path": tiny_dataset, "checkpoint.enable": "true"}


def committed(dump) -> list[int]:
    root = dump / RUN_DIR
    return sorted(int(p.parent.name.split("-")[1]) for p in root.glob("step-*/COMMIT.json"))


def test_second_writer_refused_and_orphaned_ranks_stop(base, tmp_path):
    """Run A trains; run B on the same folder is refused before it writes anything, naming A.
    Then A's torchrun agent is SIGKILLed alone: A's ranks stop within seconds and commit
    nothing more. Run C then takes over the stale lease and resumes A's newest step."""
    long_run = {**base, "training.steps": "100000", "checkpoint.interval": "5",
                "metrics.log_freq": "50"}
    dump = tmp_path / "a"
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "raytitan.train",
           *overrides_to_argv({**long_run, "job.dump_folder": str(dump)})]
    log = open(tmp_path / "a.log", "w")
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while not committed(dump) and time.time() < deadline:
            assert agent.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.2)
        assert committed(dump), "run A committed nothing"

        with pytest.raises(AssertionError) as refused:
            run_torchrun(2, {**long_run, "training.steps": "3"}, dump, read=False)
        assert "is in use by run torchrun:" in str(refused.value)
        assert f":{agent.pid} (job raytitan" in str(refused.value)
        assert agent.poll() is None  # A is unharmed

        ranks = descendants(agent.pid)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)
        deadline = time.time() + 20
        while any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in ranks):
            assert time.time() < deadline, "the ranks outlived their agent"
            time.sleep(0.2)
        after = committed(dump)
        time.sleep(2)
        assert committed(dump) == after  # nothing committed by orphans
    finally:
        _kill_tree(agent.pid)
    newest = after[-1]
    run_torchrun(2, {**long_run, "training.steps": str(newest + 1)}, dump, read=False)
    log_c = last_run_log(dump)
    assert "taking over the stale lease" in log_c and "its process is gone" in log_c
    assert f"resumed from {dump / RUN_DIR}/step-{newest}: step {newest}" in log_c


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (the torchrun agent, ranks, persisters)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize(("log_freq", "stopped_by"), [
    ("1", "step 6: loss nan, gradient norm nan: training diverged"),  # the log-step check
    ("10", "step 6: the model holds non-finite (NaN/inf) weights"),  # the save-time check
])
def test_a_diverging_run_stops_and_commits_nothing_more(base, tmp_path, log_freq, stopped_by):
    good = {**base, "training.steps": "4", "checkpoint.interval": "2",
            "checkpoint.keep_latest_k": "1"}
    run_torchrun(2, good, tmp_path)
    assert committed(tmp_path) == [4]
    # lr = inf: step 5's update makes the weights inf, step 6 computes NaN.
    with pytest.raises(AssertionError, match=re.escape(stopped_by)):
        run_torchrun(2, {**good, "training.steps": "12", "training.lr": "inf",
                         "metrics.log_freq": log_freq}, tmp_path)
    assert committed(tmp_path) == [4]  # the good step is neither replaced nor rotated out


def test_skip_mode_skips_the_bad_update(base, tmp_path):
    run_torchrun(1, {**base, "training.steps": "3", "training.max_norm": "0",
                     "training.lr": "inf", "training.on_nonfinite": "skip",
                     "checkpoint.enable": "false"}, tmp_path, read=False)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "optimizer step skipped" in last_run_log(tmp_path)


def test_minus_one_global_batch_is_kept_on_fewer_ranks(base, tmp_path):
    """Saved on 2 ranks with global_batch_size = -1 (2 x 2 = 4), resumed on 1: the run keeps
    a global batch of 4 (accumulation 2) instead of silently halving it."""
    auto = {**base, "training.global_batch_size": "-1", "training.steps": "4",
            "checkpoint.interval": "2"}
    reference = run_torchrun(2, auto, tmp_path / "ref")
    shutil.copytree(tmp_path / "ref", tmp_path / "resumed")
    losses = run_torchrun(1, {**auto, "checkpoint.load_step": "2"}, tmp_path / "resumed")
    log = last_run_log(tmp_path / "resumed")
    assert "keeping step-2's global batch of 4" in log and "accumulation 2" in log
    assert "resumed from" in log and "step 2, " in log
    assert losses[:2] == reference[:2]
    for got, want in zip(losses[2:], reference[2:], strict=True):
        assert got == pytest.approx(want, rel=1e-5)




@pytest.mark.parametrize("mode", [
    "async_with_pinned_mem",
    pytest.param("async", marks=pytest.mark.slow),
    pytest.param("disabled", marks=pytest.mark.slow),
])
def test_sigkill_of_every_process_mid_persist_loses_nothing(base, tmp_path, mode):
    """Every process of a run (agent, ranks, persist process) is SIGKILLed while step 20 is
    being written, slowly. Step 10 stays the newest committed step, the half-written step 20
    is this run's own interrupted save (deleted on restart), and the restarted run ends
    bitwise equal to an uninterrupted one. The background staging copy is slowed too: the
    saved state must still be the state of its step (the wait before optimizer.step)."""
    overrides = {**base, "training.steps": "30", "checkpoint.interval": "10",
                 "checkpoint.async_mode": mode}
    reference = run_torchrun(2, overrides, tmp_path / "reference")
    dump = tmp_path / "killed"
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "raytitan.train",
           *overrides_to_argv({**overrides, "job.dump_folder": str(dump)})]
    # ROOT too: the hooks import raytitan before `-m` puts the working directory on sys.path,
    # and that import must be this tree's (not an installed copy's: the mutation check).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([HOOKS, str(ROOT)]),
           "RAYTITAN_SLOW_STAGING_SEC": "1", "RAYTITAN_SLOW_PERSIST": "step-20:60"}
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(tmp_path / "killed.log", "w"),
                             stderr=subprocess.STDOUT)
    intent = dump / RUN_DIR / "step-20" / "SAVING.json"
    try:
        deadline = time.time() + 240
        while not intent.exists() and time.time() < deadline:
            assert agent.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.2)
        assert intent.exists(), "the save of step 20 never started"
        time.sleep(2)  # well inside the 60 s persist
    finally:
        _kill_tree(agent.pid)
        agent.wait(timeout=30)
    assert committed(dump) == [10]
    losses = run_torchrun(2, overrides, dump)
    log = last_run_log(dump)
    assert "step-20, this run's interrupted save" in log
    assert f"resumed from {dump / RUN_DIR}/step-10: step 10" in log
    assert losses == reference
