"""Config: defaults <- TOML <- CLI, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytitan.config import ConfigError, JobConfig, load_job_config, to_toml
from raytitan.config.manager import help_text, parse_cli_overrides
from raytitan.plan import build_plan

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def test_defaults_file_and_cli_precedence(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\nlr = 0.5\n[metrics]\nlog_freq = 3\n")
    cfg = load_job_config(path, ["--training.steps", "9", "--metrics.enable_tensorboard"])
    assert cfg.training.steps == 9  # CLI beats the file
    assert cfg.training.lr == 0.5  # the file beats the default
    assert cfg.metrics.log_freq == 3
    assert cfg.metrics.enable_tensorboard is True  # bare bool flag
    assert cfg.training.seq_len == JobConfig().training.seq_len  # default kept


def test_cli_equals_form_and_bool_values():
    cfg = load_job_config(None, ["--training.seed=5", "--training.deterministic", "false"])
    assert cfg.training.seed == 5 and cfg.training.deterministic is False


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_job_config(None, ["--job.description", 'say "hi"', "--training.lr", "1e-4"])
    again = load_job_config(write(tmp_path, to_toml(cfg)), [])
    assert again == cfg


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--training.stepz", "3"], "unknown config key training.stepz"),
        (["--trainin.steps", "3"], "unknown config section [trainin]"),
        (["--training.steps", "many"], "training.steps = 'many' is not an integer"),
        (["--training.steps", "0"], "training.steps = 0 must be > 0"),
        (["--model.flavor", "9B"], "model.flavor = '9B' is not valid; choose one of"),
        (["--parallelism.pipeline_parallel_schedule", "ZBV"], "['GPipe', '1F1B'"),
        (["--activation_checkpoint.mode", "some"], "activation_checkpoint.mode = 'some'"),
        (["--training.mixed_precision_param", "fp8"], "float32"),
        (["--training.mixed_precision_param", "float16"], "choose one of ['float32', 'bfloat16']"),
        (["--training.deterministic", "maybe"], "is not a bool"),
        (["--training.steps"], "--training.steps needs a value"),
        (["steps"], "expected --section.key value"),
    ],
)
def test_bad_values_name_field_value_and_choices(argv, message):
    with pytest.raises(ConfigError) as e:
        load_job_config(None, argv)
    assert message in str(e.value)


def test_bad_toml_types_and_keys(tmp_path):
    with pytest.raises(ConfigError, match="training.lr = 'fast' is not a number"):
        load_job_config(write(tmp_path, '[training]\nlr = "fast"\n'))
    with pytest.raises(ConfigError, match=r"unknown config key model.size; valid keys"):
        load_job_config(write(tmp_path, "[model]\nsize = 3\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job_config(write(tmp_path, "[model\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_config(str(tmp_path / "missing.toml"))


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--parallelism.tensor_parallel_degree", "2",
          "--parallelism.data_parallel_shard_degree", "3"], 4,
         "parallelism.data_parallel_replicate_degree (1) * data_parallel_shard_degree (3) * "
         "tensor_parallel_degree (2) * pipeline_parallel_degree (1) = 6 != world size 4"),
        (["--parallelism.tensor_parallel_degree", "2",
          "--parallelism.data_parallel_shard_degree", "3"], 4,
         "valid data_parallel_shard_degree values for world size 4: [-1, 2]"),
        (["--parallelism.tensor_parallel_degree", "3"], 4,
         "parallelism.data_parallel_replicate_degree (1) * tensor_parallel_degree (3) * "
         "pipeline_parallel_degree (1) = 3 must divide world size 4"),
        (["--parallelism.tensor_parallel_degree", "3"], 4,
         "valid tensor_parallel_degree values for world size 4: [1, 2, 4]"),
        (["--parallelism.tensor_parallel_degree", "2",
          "--parallelism.pipeline_parallel_degree", "3"], 4,
         "valid pipeline_parallel_degree values for world size 4: [1, 2]"),
        (["--parallelism.tensor_parallel_degree", "16", "--model.flavor", "8B"], 16,
         "n_kv_heads (8) is not divisible by tensor_parallel_degree (16)"),
        (["--parallelism.pipeline_parallel_degree", "8"], 8,
         "needs 8 stages but model debug has 4 layers"),
        (["--training.global_batch_size", "12", "--training.local_batch_size", "4"], 2,
         "must be a multiple of local_batch_size (4) * dp degree (2) = 8"),
        (["--parallelism.pipeline_parallel_degree", "2", "--parallelism.microbatches", "3",
          "--training.local_batch_size", "4"], 2, "must be divisible by parallelism.microbatches"),
        (["--model.flavor", "1B", "--parallelism.tensor_parallel_degree", "2"], 2,
         "ties input and output embeddings"),
        (["--parallelism.pipeline_parallel_degree", "2", "--parallelism.microbatches", "1"], 2,
         "1F1B needs parallelism.microbatches (1) >= pipeline_parallel_degree (2)"),
        (["--parallelism.pipeline_parallel_degree", "2", "--parallelism.microbatches", "5",
          "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
          "--training.local_batch_size", "10"], 2,
         "Interleaved1F1B needs parallelism.microbatches (5) to be a multiple of"),
    ],
)
def test_impossible_meshes_and_batches(argv, world, message):
    cfg = load_job_config(None, argv)
    with pytest.raises(ConfigError) as e:
        build_plan(cfg, world)
    assert message in str(e.value)


def test_batch_arithmetic():
    cfg = load_job_config(None, ["--training.local_batch_size", "2",
                                 "--training.global_batch_size", "16"])
    plan = build_plan(cfg, 4)
    assert (plan.parallel_dims.dp_shard, plan.grad_accum_steps) == (4, 2)
    assert plan.tokens_per_step == 16 * cfg.training.seq_len


def test_help_lists_every_field_with_its_docstring():
    text = help_text()
    assert "--training.global_batch_size (int, default -1)" in text
    assert "Pipeline schedule: GPipe, 1F1B or Interleaved1F1B" in text
    for section, values in JobConfig().__dict__.items():
        for key in values.__dict__:
            assert f"--{section}.{key} " in text


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_job_parses_and_fits_its_world(path):
    cfg = load_job_config(str(path))
    build_plan(cfg, cfg.ray.num_workers)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", " run", "\trun"])
def test_job_name_must_be_one_folder_name(name):
    """job.name is a folder under checkpoint.folder: '..' would put steps outside it."""
    with pytest.raises(ConfigError) as e:
        load_job_config(None, ["--job.name", name])
    assert f"job.name = {name!r}" in str(e.value) and "'..'" in str(e.value)


def test_parse_cli_overrides_lists():
    assert parse_cli_overrides(["--job.name", "x"]) == {"job": {"name": "x"}}


def test_launcher_pins_every_local_path_for_the_workers(tmp_path, monkeypatch):
    """Ray workers do not run in the driver's directory: relative paths become absolute,
    URLs stay as they are."""
    from raytitan.launcher import absolutize

    monkeypatch.chdir(tmp_path)
    cfg = load_job_config(None, [
        "--job.dump_folder", "out", "--data.path", "s3://bucket/tokens",
        "--model.hf_assets_path", "hf", "--checkpoint.initial_load_path", "seed/step-0"])
    fixed = absolutize(cfg)
    assert fixed.job.dump_folder == str(tmp_path / "out")
    assert fixed.model.hf_assets_path == str(tmp_path / "hf")
    assert fixed.checkpoint.initial_load_path == str(tmp_path / "seed" / "step-0")
    assert fixed.data.path == "s3://bucket/tokens"
