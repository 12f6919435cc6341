"""Shared fixtures: a tiny prepared dataset, and a helper that runs the Trainer under
torchrun (gloo, CPU) and returns the logged losses."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The run every distributed test compares: debug model, fp32, fixed seed and data. The global
# batch (8) is fixed, so every mesh sees the same samples per step (accumulation absorbs dp).
BASE_OVERRIDES = {
    "model.flavor": "debug",
    "training.steps": "10",
    "training.seq_len": "64",
    "training.local_batch_size": "2",
    "training.global_batch_size": "8",
    "training.lr": "3e-4",
    "training.warmup_steps": "2",
    "training.mixed_precision_param": "float32",
    "training.num_threads": "1",
    "metrics.log_freq": "1",
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """~150 k tokens of Python's language reference, a 512-token BPE, 16 k-token shards."""
    from pydoc_data.topics import topics

    from raytitan.data.prepare import prepare_local

    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for key in sorted(topics):
            f.write(json.dumps({"text": topics[key]}) + "\n")
    out = root / "prepared"
    prepare_local(str(corpus), str(out), vocab_size=512, shard_tokens=16384)
    return str(out)


@pytest.fixture(scope="module")
def world_of_one():
    """A world-1 gloo process group for the module (in-process Trainer and checkpoint tests)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


# Checkpoint managers opened by in-process tests; closed (lease released, heartbeat stopped)
# after each test, so no heartbeat thread outlives its tmp_path.
OPEN_MANAGERS: list = []


@pytest.fixture(autouse=True)
def close_open_managers():
    yield
    while OPEN_MANAGERS:
        manager = OPEN_MANAGERS.pop()
        with contextlib.suppress(Exception):  # the test already judged its failures
            manager.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides_to_argv(overrides: dict[str, str]) -> list[str]:
    argv = []
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return argv


_RUN_MARK = "=== run_torchrun: "


def last_run_log(dump_folder: str | Path) -> str:
    """The output of the last run_torchrun into `dump_folder`."""
    return (Path(dump_folder) / "torchrun.log").read_text().rsplit(_RUN_MARK, 1)[-1]


def read_losses(dump_folder: str | Path) -> list[float]:
    with open(Path(dump_folder) / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


HOOKS = str(ROOT / "tests" / "fault_hooks")


def run_torchrun(nproc: int, overrides: dict[str, str], dump_folder: Path,
                 timeout: int = 300, *, read: bool = True, env: dict[str, str] | None = None,
                 max_restarts: int = 0) -> list[float]:
    """Run `python -m torch.distributed.run -m raytitan.train` and return the losses
    (of steps 1.. in metrics.jsonl, which a resumed run extends). `env`: extra variables
    (with any, the fault hooks of tests/fault_hooks are loaded too)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--max-restarts={max_restarts}",
        f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        "-m", "raytitan.train",
        *overrides_to_argv({**overrides, "job.dump_folder": str(dump_folder)}),
    ]
    extra = {"PYTHONPATH": os.pathsep.join([HOOKS, str(ROOT)]), **env} if env else {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
    os.makedirs(dump_folder, exist_ok=True)
    with open(Path(dump_folder) / "torchrun.log", "a") as log:  # every run's output, in order
        log.write(f"{_RUN_MARK}{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0 and _aborted_after_finishing(proc.stdout, proc.stderr):
        print(f"torchrun: a process aborted at exit after the run finished (ignored):\n"
              f"{proc.stderr[-2000:]}")
    elif proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return read_losses(dump_folder) if read else []


def _aborted_after_finishing(stdout: str, stderr: str) -> bool:
    """A known torch/gloo exit-time abort (PLATFORM.md: rare, after the work is complete):
    rank 0 logged `done:` after every rank passed the final barrier, the only C++ failure is
    std::terminate, every failed process died of SIGABRT (torchrun's summary: exitcode -6),
    and the only Python traceback is torchrun's own report of that."""
    exitcodes = re.findall(r"exitcode\s*: (-?\d+)", stderr)
    return (re.search(r"\[rank0\] [\d:]+ done: ", stdout) is not None
            and "terminate called without an active exception" in stdout + stderr
            and bool(exitcodes) and all(code == "-6" for code in exitcodes)
            and stderr.count("Traceback (most recent call last)") == 1
            and "ChildFailedError" in stderr)


def start_moto(log_path) -> tuple[subprocess.Popen, str]:
    """moto_server on 127.0.0.1 (a free port), logging to `log_path`: (process, endpoint)."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


@contextlib.contextmanager
def moto_s3(log_path, bucket: str) -> Iterator[str]:
    """moto_server on loopback with the standard AWS env pointed at it and `bucket` made:
    yields "s3://<bucket>"; stops the server and restores the env after."""
    proc, endpoint = start_moto(log_path)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """Start moto_server on loopback, point the standard AWS env at it, make a bucket."""
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    with moto_s3(tmp_path_factory.mktemp("moto") / "moto.log", "raytitan-test") as url:
        yield url
