"""Error cases that must end in one clear line, not a traceback or a silent success:
missing checkpoint paths, unreachable or refusing object stores, a damaged metrics.jsonl.

`raytitan` exits 2 for every error `cli.main` reports (the convention of `main`: bad
config, missing input, ...); 1 is kept for `ckpt verify` finding a step damaged."""

from __future__ import annotations

import json
import logging
import socket

import pytest

from raytitan import cli
from raytitan.config.job_config import Metrics
from raytitan.metrics import MetricsLogger


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`raytitan *argv` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code, out, err


# -- missing checkpoint paths -------------------------------------------------------------


def test_ckpt_ls_of_a_missing_folder_is_an_error(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    code, _, err = run_cli(capsys, "ckpt", "ls", missing)
    assert code == 2
    assert f"raytitan ckpt: error: {missing} does not exist" in err
    assert "Traceback" not in err


def test_ckpt_ls_of_an_empty_folder_is_not_an_error(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "ckpt", "ls", str(tmp_path))
    assert code == 0 and "no step directories" in out


@pytest.mark.parametrize("action", ["show", "verify"])
def test_ckpt_show_and_verify_of_a_missing_step(tmp_path, capsys, action):
    (tmp_path / "step-2").mkdir()
    step_dir = str(tmp_path / "step-3")
    code, _, err = run_cli(capsys, "ckpt", action, step_dir)
    assert code == 2
    assert f"raytitan ckpt: error: {step_dir} does not exist" in err
    assert "step directories in" in err and "[2]" in err  # what is there instead
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- object stores ------------------------------------------------------------------------


@pytest.fixture
def closed_endpoint(monkeypatch) -> str:
    """An S3 endpoint on 127.0.0.1 that refuses connections, dummy credentials, one attempt
    per request (botocore would otherwise retry with backoff)."""
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize(
    "argv",
    [
        ["ckpt", "ls", "s3://bucket/run"],
        ["ckpt", "show", "s3://bucket/run/step-2"],
        ["ckpt", "verify", "s3://bucket/run/step-2"],
        ["convert", "to-hf", "s3://bucket/run/step-2", "{tmp}/hf"],
        ["convert", "to-torch", "s3://bucket/run/step-2", "{tmp}/model.pt"],
    ],
)
def test_unreachable_s3_endpoint_is_one_line(closed_endpoint, tmp_path, capsys, argv):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, _, err = run_cli(capsys, *argv, "--storage-option", f"endpoint_url={closed_endpoint}")
    assert code == 2
    line = err.strip()
    assert "Traceback" not in err and len(line.splitlines()) == 1, err
    url = next(a for a in argv if a.startswith("s3://"))
    assert line.startswith(f"raytitan {argv[0]}: error: {url}: ")
    assert closed_endpoint in line and "endpoint_url" in line


def _client_error(code: str, message: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, "ListObjectsV2")


@pytest.mark.parametrize(
    "error, cause",
    [
        (
            lambda: _client_error("NoSuchBucket", "The specified bucket does not exist"),
            "The specified bucket does not exist",
        ),
        (lambda: _client_error("AccessDenied", "Access Denied"), "Access Denied"),
        # what s3fs makes of those two
        (lambda: FileNotFoundError("The specified bucket does not exist"), "bucket does not exist"),
        (lambda: PermissionError("Access Denied"), "Access Denied"),
    ],
)
def test_storage_errors_name_the_url(monkeypatch, capsys, error, cause):
    from raytitan.checkpoint import inspect

    def fail(*args):
        raise error()

    monkeypatch.setattr(inspect, "ls", fail)
    code, _, err = run_cli(capsys, "ckpt", "ls", "s3://bucket/run")
    assert code == 2
    assert err.startswith("raytitan ckpt: error: s3://bucket/run: ") and cause in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- metrics.jsonl on resume --------------------------------------------------------------


def _write_records(path, steps, tail: str = "") -> None:
    with open(path, "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
        f.write(tail)


def _steps(path) -> list[int]:
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


def test_resume_drops_a_torn_last_metrics_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _write_records(path, [1, 2, 3, 4], tail='{"step": 5, "lo')  # crashed mid-write
    with caplog.at_level(logging.WARNING, logger="raytitan"):
        metrics = MetricsLogger(Metrics(), str(tmp_path), "run", enabled=True, resume_step=3)
    metrics.close()
    assert _steps(path) == [1, 2, 3]
    assert f"{path} line 5" in caplog.text


def test_resume_keeps_a_complete_last_line_without_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_records(path, [1], tail=json.dumps({"step": 2, "loss": 0.5}))
    metrics = MetricsLogger(Metrics(), str(tmp_path), "run", enabled=True, resume_step=2)
    metrics.log(
        3,
        {
            "loss": 0.1,
            "grad_norm": 1.0,
            "lr": 1e-3,
            "tokens_per_sec": 1.0,
            "memory_gib": 0.0,
            "data_wait_sec": 0.0,
        },
    )
    metrics.close()
    assert _steps(path) == [1, 2, 3]


def test_resume_refuses_a_damaged_metrics_line_in_the_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_records(path, [1], tail='{"step": 2, "lo\n' + json.dumps({"step": 3}) + "\n")
    with pytest.raises(ValueError, match=rf"{path} line 2 .*fix or delete"):
        MetricsLogger(Metrics(), str(tmp_path), "run", enabled=True, resume_step=3)
    assert path.read_text().count("\n") == 3  # left as it was


# -- warm restarts where they cannot work ---------------------------------------------------


def test_warm_restarts_are_refused_without_torchrun_and_under_ray(monkeypatch, capsys):
    from raytitan import launcher, train
    from raytitan.config import ConfigError, load_job_config

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with pytest.raises(SystemExit) as e:
        train.main(["--training.warm_restarts", "1"])
    assert "training.warm_restarts = 1 needs torchrun" in str(e.value.code)
    with pytest.raises(ConfigError, match=r"warm_restarts = 2 works under torchrun only.*"
                                          r"ray.max_failures"):
        launcher.launch(load_job_config(None, ["--training.warm_restarts", "2"]))
    with pytest.raises(ConfigError, match=r"training.warm_restarts = -1 must be >= 0"):
        load_job_config(None, ["--training.warm_restarts", "-1"])
