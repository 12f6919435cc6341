"""cluster.yaml: accepted by Ray's own cluster-config validation (offline: no AWS credentials,
no network), and shaped for raytitan: CPU head, 8-GPU workers, GPU image, raytitan installed,
S3 for data and checkpoints."""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raytitan.config import load_job_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
JOB_8B = ROOT / "jobs" / "llama3_8b.toml"

# AWS instance types with 8 GPUs (H100 / H200 / A100), what the 8B job's TP 8 expects per node.
EIGHT_GPU_INSTANCES = {
    "p5.48xlarge",
    "p5e.48xlarge",
    "p5en.48xlarge",
    "p4d.24xlarge",
    "p4de.24xlarge",
}


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connect fails: proves that Ray's config checks never reach AWS."""

    def refuse(self, *args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture
def prepared(raw, no_network) -> dict[str, Any]:
    """What `ray up` validates: the file merged over Ray's AWS defaults.yaml."""
    return prepare_config(copy.deepcopy(raw))


def worker_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node
        for name, node in cfg["available_node_types"].items()
        if name != cfg["head_node_type"]
    }


def all_commands(cfg: dict[str, Any]) -> list[str]:
    return [
        cmd
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
        for cmd in cfg.get(key, [])
    ]


def test_ray_validation_accepts_cluster_yaml(prepared):
    validate_config(prepared)  # Ray's JSON schema + node-type consistency checks


def test_our_commands_replace_rays_defaults(raw, prepared):
    # Ray merges its defaults.yaml one level deep: a top-level key left out of cluster.yaml
    # takes Ray's default (for setup_commands: a Ray nightly wheel install).
    assert prepared["setup_commands"] == raw["setup_commands"]
    assert "ray-wheels" not in yaml.safe_dump(prepared)
    assert prepared["available_node_types"].keys() == raw["available_node_types"].keys()


def test_head_is_a_cpu_node_that_takes_no_work(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] == 0  # Ray Data tasks run on the GPU nodes instead
    assert not head["node_config"]["InstanceType"].startswith(("p", "g"))  # no GPU instance
    assert head["max_workers"] == 0  # filled in by prepare_config


def test_gpu_workers_have_8_gpus_and_autoscaling_bounds(prepared):
    (gpu,) = worker_types(prepared).values()
    assert gpu["resources"]["GPU"] == 8
    assert gpu["node_config"]["InstanceType"] in EIGHT_GPU_INSTANCES
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= prepared["max_workers"]
    # The cluster can hold the 8B job: one Ray Train worker per GPU.
    job = load_job_config(str(JOB_8B))
    assert job.ray.use_gpu
    assert gpu["max_workers"] * gpu["resources"]["GPU"] >= job.ray.num_workers


def test_every_node_has_an_explicit_ami(prepared):
    # Ray's fallback AMI (Ubuntu 18.04 Deep Learning AMI) predates H100 drivers.
    for node in prepared["available_node_types"].values():
        assert node["node_config"]["ImageId"].startswith("ami-")


def test_docker_image_is_rays_gpu_image_for_this_ray_and_python(prepared):
    docker = prepared["docker"]
    image = docker["image"]
    assert image.startswith("rayproject/ray") and "gpu" in image
    assert f":{ray.__version__}-py311-" in image  # cluster Ray == the Ray that submits
    run_options = docker["run_options"] + docker["worker_run_options"]
    assert any(opt.startswith("--ulimit nofile=") for opt in run_options)
    # DCP's async_with_pinned_mem staging and NCCL live in /dev/shm on the GPU nodes.
    assert any(opt.startswith("--shm-size=") for opt in docker["worker_run_options"])


def test_setup_installs_raytitan_from_the_synced_checkout(prepared):
    remote = next(r for r, local in prepared["file_mounts"].items() if local == ".")
    for key in ("head_setup_commands", "worker_setup_commands"):  # merged by prepare_config
        assert f"pip install -e {remote}" in prepared[key]
    commands = " ".join(all_commands(prepared))
    assert "download.pytorch.org/whl/cpu" not in commands and "+cpu" not in commands


def test_nodes_reach_s3_and_the_8b_job_uses_it(prepared):
    for node in prepared["available_node_types"].values():
        arn = node["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn
    job = load_job_config(str(JOB_8B))
    assert job.checkpoint.folder.startswith("s3://")
    assert job.data.path.startswith("s3://")


GPU_TYPE = ("available_node_types", "gpu_8x_h100")


@pytest.mark.parametrize(
    "path, value, message",
    [
        pytest.param(("max_worker",), 8, "'max_worker' was unexpected", id="unknown-key"),
        pytest.param(("max_workers",), "8", "'8' is not of type 'integer'", id="str-max"),
        pytest.param((*GPU_TYPE, "resources", "GPU"), 7.5, "7.5 is not of type", id="fraction-gpu"),
        pytest.param((*GPU_TYPE, "min_worker"), 1, "'min_worker' was unexpected", id="type-typo"),
        # --shm-size is a docker run option, not a key of `docker`.
        pytest.param(("docker", "shm_size"), "512g", "'shm_size' was unexpected", id="docker"),
        pytest.param(
            (*GPU_TYPE, "min_workers"),
            9,
            "smaller than the sum of `min_workers`",
            id="min-above-global-max",
        ),
        pytest.param(
            ("head_node_type",),
            "cpu_head",
            "must be one of `available_node_types`",
            id="unknown-head-type",
        ),
    ],
)
def test_ray_validation_rejects_a_broken_copy(raw, no_network, path, value, message):
    broken = copy.deepcopy(raw)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_config(prepare_config(broken))
