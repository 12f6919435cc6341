"""Every parallelism trains the same model on the same samples: the first 10 losses of each
mesh match the single-process run within 1e-5 relative (fp32, fixed seed and data)."""

from __future__ import annotations

import pytest

from tests.conftest import BASE_OVERRIDES, run_torchrun

MESHES = {
    "fsdp2": (2, {"parallelism.data_parallel_shard_degree": "2"}),
    "hsdp": (4, {"parallelism.data_parallel_replicate_degree": "2",
                 "parallelism.data_parallel_shard_degree": "2"}),
    "tp2_sp": (2, {"parallelism.tensor_parallel_degree": "2"}),
    "pp2_gpipe": (2, {"parallelism.pipeline_parallel_degree": "2",
                      "parallelism.pipeline_parallel_schedule": "GPipe"}),
    "pp2_1f1b": (2, {"parallelism.pipeline_parallel_degree": "2",
                     "parallelism.pipeline_parallel_schedule": "1F1B"}),
    "pp2_interleaved": (2, {"parallelism.pipeline_parallel_degree": "2",
                            "parallelism.pipeline_parallel_schedule": "Interleaved1F1B"}),
    "dp2_tp2": (4, {"parallelism.data_parallel_shard_degree": "2",
                    "parallelism.tensor_parallel_degree": "2"}),
}


@pytest.fixture(scope="module")
def reference_losses(tiny_dataset, tmp_path_factory):
    overrides = {**BASE_OVERRIDES, "data.path": tiny_dataset}
    losses = run_torchrun(1, overrides, tmp_path_factory.mktemp("single"))
    assert len(losses) == 10
    assert losses[-1] < losses[0]
    return losses


@pytest.mark.parametrize("name", list(MESHES))
def test_losses_match_single_process(name, reference_losses, tiny_dataset, tmp_path):
    nproc, mesh = MESHES[name]
    overrides = {**BASE_OVERRIDES, **mesh, "data.path": tiny_dataset}
    losses = run_torchrun(nproc, overrides, tmp_path)
    assert len(losses) == len(reference_losses)
    for step, (got, want) in enumerate(zip(losses, reference_losses), start=1):
        assert abs(got - want) <= 1e-5 * abs(want), (
            f"{name}: step {step} loss {got!r} != single-process {want!r}\n"
            f"all: {losses}\nref: {reference_losses}"
        )
