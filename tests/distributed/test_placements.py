"""What each parallelism and trainer feature actually does to the model, read on the workers
(tests/distributed/inspect_model.py). Loss comparisons alone still pass when a feature is
silently off: TP on replicated weights, no activation checkpointing, no compile, no bf16."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raytitan.data.prepare import Manifest
from raytitan.models.llama3 import LLAMA3_FLAVORS, Llama3
from tests.conftest import BASE_OVERRIDES, ROOT, free_port, overrides_to_argv

INSPECT = Path(__file__).with_name("inspect_model.py")
BLOCKS = [f"layers.{i}" for i in range(LLAMA3_FLAVORS["debug"].n_layers)]

# name: (processes, overrides, run a forward). Each runs once per module (~6-15 s).
RUNS = {
    "tp2": (2, {"parallelism.tensor_parallel_degree": "2"}, True),
    "fsdp2_bf16": (2, {"parallelism.data_parallel_shard_degree": "2",
                       "training.mixed_precision_param": "bfloat16"}, True),
    "dp2_tp2": (4, {"parallelism.data_parallel_shard_degree": "2",
                    "parallelism.tensor_parallel_degree": "2"}, True),
    "ac_full": (1, {"activation_checkpoint.mode": "full"}, True),
    "ac_selective": (1, {"activation_checkpoint.mode": "selective"}, True),
    # Wrappers only: a forward would compile every block (~18 s each on 2 cores).
    "compile": (1, {"compile.enable": "true"}, False),
}

# The TP placement of each weight: ColwiseParallel shards the output dim (0), RowwiseParallel
# the input dim (1) of a Linear; the embedding's RowwiseParallel shards its rows (vocab, 0).
TP_PLACEMENTS = {
    "attention.wq": "Shard(dim=0)", "attention.wk": "Shard(dim=0)",
    "attention.wv": "Shard(dim=0)", "attention.wo": "Shard(dim=1)",
    "feed_forward.w1": "Shard(dim=0)", "feed_forward.w3": "Shard(dim=0)",
    "feed_forward.w2": "Shard(dim=1)",
    "tok_embeddings": "Shard(dim=0)", "output": "Shard(dim=0)",
}
# FSDP2 shards dim 0; on top of TP's Shard(0) it says _StridedShard(dim=0, sf=2).
FSDP_PLACEMENT = re.compile(r"(_Strided)?Shard\(dim=0\b")


def tp_placement(name: str) -> str:
    module = name.removesuffix(".weight").split(".", 2)[-1]  # drop "layers.<i>."
    return TP_PLACEMENTS.get(module, "Replicate()")  # norms: replicated (sequence parallel)


def sharded_shape(full: list[int], placements: list[str]) -> list[int]:
    shape = list(full)
    for placement in placements:
        if (m := re.search(r"Shard\(dim=(\d+)", placement)) is not None:
            shape[int(m.group(1))] //= 2  # every degree here is 2, every dim even
    return shape


@pytest.fixture(scope="module")
def full_shapes(tiny_dataset) -> dict[str, list[int]]:
    args = dataclasses.replace(LLAMA3_FLAVORS["debug"],
                               vocab_size=Manifest.load(tiny_dataset).vocab_size)
    with torch.device("meta"):
        model = Llama3(args)
    return {name: list(p.shape) for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def inspect(tiny_dataset, tmp_path_factory):
    """inspect(name) -> the per-rank reports of RUNS[name] (each run once)."""
    reports: dict[str, list[dict]] = {}

    def run(name: str) -> list[dict]:
        if name not in reports:
            nproc, overrides, forward = RUNS[name]
            out = tmp_path_factory.mktemp(f"inspect_{name}")
            cmd = [
                sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(INSPECT),
                str(out / "reports"), *([] if forward else ["--no-forward"]),
                *overrides_to_argv({**BASE_OVERRIDES, **overrides, "data.path": tiny_dataset,
                                    "job.dump_folder": str(out)}),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
            reports[name] = [json.loads((out / "reports" / f"rank{r}.json").read_text())
                             for r in range(nproc)]
        return reports[name]

    return run


def test_tp_shards_attention_and_mlp(inspect, full_shapes):
    for rank, report in enumerate(inspect("tp2")):
        assert sorted(p["name"] for p in report["params"]) == sorted(full_shapes)
        for p in report["params"]:
            want = [tp_placement(p["name"])]
            assert (p["dtensor"], p["mesh_dims"], p["placements"]) == (True, ["tp"], want), (
                f"rank {rank}: {p}")
            assert p["local_shape"] == sharded_shape(full_shapes[p["name"]], want), p
        assert report["fsdp"] == [] and report["forward_dtype"] == "torch.float32"


def test_fsdp_shards_every_param_on_dim0(inspect, full_shapes):
    for report in inspect("fsdp2_bf16"):
        for p in report["params"]:
            assert (p["dtensor"], p["mesh_dims"], p["placements"]) == (
                True, ["dp_shard"], ["Shard(dim=0)"]), p
            assert p["local_shape"] == sharded_shape(full_shapes[p["name"]], p["placements"])
            assert p["dtype"] == "torch.float32", p  # the sharded (master) weights stay fp32
        assert sorted(report["fsdp"]) == sorted(["", *BLOCKS])


def test_fsdp_over_tp_shards_on_both_dims(inspect, full_shapes):
    for report in inspect("dp2_tp2"):
        for p in report["params"]:
            assert p["dtensor"] and p["mesh_dims"] == ["dp_shard", "tp"], p
            dp, tp = p["placements"]
            assert FSDP_PLACEMENT.match(dp) and tp == tp_placement(p["name"]), p
            assert p["local_shape"] == sharded_shape(full_shapes[p["name"]], p["placements"])
        assert sorted(report["fsdp"]) == sorted(["", *BLOCKS])
        assert report["forward_dtype"] == "torch.float32"  # FSDP with fp32 params


def test_bf16_fsdp_forward_runs_in_bf16(inspect):
    for report in inspect("fsdp2_bf16"):
        assert report["forward_dtype"] == "torch.bfloat16"


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_wraps_every_block(mode, inspect):
    (report,) = inspect(f"ac_{mode}")
    assert report["checkpoint_wrapped"] == {block: mode for block in BLOCKS}
    assert report["compiled"] == [] and report["forward_dtype"] == "torch.float32"


def test_compile_wraps_every_block(inspect):
    (report,) = inspect("compile")
    assert report["compiled"] == BLOCKS
    assert report["checkpoint_wrapped"] == {}
