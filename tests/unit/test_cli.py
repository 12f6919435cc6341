"""The `raytitan` command line: help, dry run, errors, prepare."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def raytitan(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raytitan.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_train_help_shows_fields():
    proc = raytitan("train", "--help")
    assert proc.returncode == 0
    assert "--parallelism.tensor_parallel_degree (int, default 1)" in proc.stdout
    assert "Tensor parallel degree" in proc.stdout


def test_dry_run_8b_on_64_gpus():
    proc = raytitan("train", "--config", "jobs/llama3_8b.toml", "--dry-run",
                    "--ray.num_workers", "64")
    assert proc.returncode == 0, proc.stderr
    assert "world 64 = pp 1 x dp_replicate 1 x dp_shard 8 x tp 8" in proc.stdout
    assert "8.030 B params" in proc.stdout


def test_bad_config_exits_2_with_the_message():
    proc = raytitan("train", "--config", "jobs/debug.toml", "--dry-run",
                    "--parallelism.tensor_parallel_degree", "3")
    assert proc.returncode == 2
    assert ("parallelism.data_parallel_replicate_degree (1) * tensor_parallel_degree (3) * "
            "pipeline_parallel_degree (1) = 3 must divide world size 2") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_command():
    proc = raytitan("fly")
    assert proc.returncode == 2 and "commands:" in proc.stderr


def test_prepare_local_cli(tmp_path):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text(f"document {i} " + "hello world " * 200)
    out = tmp_path / "out"
    proc = raytitan("prepare", "--input", str(corpus), "--output", str(out), "--local",
                    "--vocab-size", "300")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["num_docs"] for s in manifest["shards"]) == 3
    assert 258 < manifest["vocab_size"] <= 300  # BPE stops early on a tiny corpus


def test_prepare_missing_input_is_a_clear_error(tmp_path):
    proc = raytitan("prepare", "--input", str(tmp_path / "nope"), "--output",
                    str(tmp_path / "o"), "--local")
    assert proc.returncode == 2 and "no input files" in proc.stderr
