"""Checkpoints under Ray: a worker killed mid-run is restarted by Ray and continues from the
newest committed step; a driver killed mid-run is resumed by re-running the same job. Both
finish with losses bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BASE_OVERRIDES, ROOT, overrides_to_argv, read_losses, run_torchrun
from tests.integration.test_ray import RAY_ENV


@pytest.fixture(scope="module")
def base(tiny_dataset):
    return {**BASE_OVERRIDES, "data.path": tiny_dataset, "training.steps": "20",
            "checkpoint.enable": "true", "checkpoint.interval": "10", "ray.num_workers": "2",
            "ray.max_failures": "1", "job.name": "ft"}


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """Uninterrupted; torchrun and Ray give bitwise-equal losses (test_ray.py)."""
    return run_torchrun(2, base, tmp_path_factory.mktemp("reference"))


def start_job(overrides: dict, dump: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "raytitan.cli", "train",
           *overrides_to_argv({**overrides, "job.dump_folder": str(dump)})]
    log = open(dump.parent / f"{dump.name}.log", "a")
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **RAY_ENV}, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_for_step(dump: Path, step: int, committed: int, proc: subprocess.Popen,
                  timeout: float = 300) -> None:
    """Until `step` is logged and the checkpoint of step `committed` is committed."""
    commit = dump / "checkpoint" / "ft" / f"step-{committed}" / "COMMIT.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the job exited early ({proc.returncode})"
        try:
            steps = [json.loads(line)["step"] for line in open(dump / "metrics.jsonl")]
        except (FileNotFoundError, ValueError):
            steps = []
        if steps and steps[-1] >= step and commit.exists():
            return
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not logged, or step-{committed} not committed, in {timeout}s")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def finish(proc: subprocess.Popen, dump: Path, timeout: float = 400) -> None:
    rc = proc.wait(timeout=timeout)
    log = (dump.parent / f"{dump.name}.log").read_text()
    assert rc == 0, log[-6000:]


def test_worker_killed_after_step_13_is_restarted_and_finishes_exactly(base, reference, tmp_path):
    overrides = {**base, "checkpoint.async_mode": "async_with_pinned_mem"}
    dump = tmp_path / "run"
    proc = start_job(overrides, dump)
    try:
        wait_for_step(dump, 13, 10, proc)
        workers = [p for p in descendants(proc.pid) if "RayTrainWorker" in cmdline(p)]
        assert workers, "no RayTrainWorker process found"
        os.kill(workers[0], signal.SIGKILL)
        finish(proc, dump)
    finally:
        proc.kill()
    log = (tmp_path / "run.log").read_text()
    assert "RETRY" in log  # Ray restarted the worker group ...
    assert "/checkpoint/ft/step-10 in" in log.split("RETRY", 1)[1]  # ... which loaded step 10
    assert read_losses(dump) == reference  # steps 1-10 from before, 11-20 recomputed


@pytest.mark.slow  # 85 s; the worker-kill test above keeps Ray restore in CI
def test_driver_killed_then_rerun_resumes_the_same_job(base, reference, tmp_path):
    overrides = {**base, "checkpoint.async_mode": "async", "ray.max_failures": "0"}
    dump = tmp_path / "run"
    proc = start_job(overrides, dump)
    try:
        wait_for_step(dump, 13, 10, proc)
        for pid in [proc.pid, *descendants(proc.pid)]:  # the driver and its local Ray
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    finally:
        proc.kill()
    step_dirs = sorted(p.name for p in (dump / "checkpoint" / "ft").glob("step-*"))
    assert "step-10" in step_dirs and "step-20" not in step_dirs
    proc = start_job(overrides, dump)
    try:
        finish(proc, dump)
    finally:
        proc.kill()
    assert "/checkpoint/ft/step-10 in" in (tmp_path / "run.log").read_text()
    assert read_losses(dump) == reference


def test_a_deterministic_error_is_not_retried(base, tmp_path):
    """A bad load_step fails the same way on every restart: with ray.max_failures = 3 the
    run still ends after the first attempt, with the error, instead of burning restarts."""
    overrides = {**base, "ray.max_failures": "3", "checkpoint.load_step": "5"}
    dump = tmp_path / "run"
    proc = start_job(overrides, dump)
    try:
        rc = proc.wait(timeout=300)
    finally:
        proc.kill()
    log = (tmp_path / "run.log").read_text()
    assert rc != 0
    assert "checkpoint.load_step = 5" in log and "ray.max_failures is not used" in log
    assert "RETRY" not in log, log[-4000:]
