"""A resume spends nothing on work the load overwrites: the weights are initialized after
the load, only where it left them empty, and Adam's state is made without a dummy step.
The real Trainer in this process (a world-1 gloo group)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytitan.checkpoint import CheckpointError
from raytitan.checkpoint.fast import _fill
from raytitan.checkpoint.loading import LoadResult
from raytitan.checkpoint.state import init_adam_state
from raytitan.config import load_job_config
from raytitan.models.llama3 import Llama3
from raytitan.train import Trainer
from tests.conftest import BASE_OVERRIDES, overrides_to_argv

pytestmark = pytest.mark.usefixtures("world_of_one")


def job(tiny_dataset: str, dump: Path, **overrides: str):
    return load_job_config(None, overrides_to_argv({
        **BASE_OVERRIDES, "data.path": tiny_dataset, "job.dump_folder": str(dump),
        "checkpoint.enable": "true", "checkpoint.interval": "2", "training.steps": "2",
        **overrides}))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model_parts[0].state_dict().items()}


@pytest.fixture
def initialized(monkeypatch) -> list[str]:
    """The names of the parameters the model initializes (randomly or with ones)."""
    names: list[str] = []
    original = Llama3._init_param

    def counting(self, name, full, gen):
        names.append(name)
        return original(self, name, full, gen)

    monkeypatch.setattr(Llama3, "_init_param", counting)
    return names


def test_a_resume_initializes_no_weight_and_loads_them_all(tiny_dataset, tmp_path, initialized,
                                                           monkeypatch):
    trained = Trainer(job(tiny_dataset, tmp_path))
    trained.train()
    saved = weights(trained)
    fresh_count = len(initialized)
    assert fresh_count == len(saved)  # a fresh start initializes every parameter
    trained.checkpointer.close()

    initialized.clear()
    steps: list[int] = []
    adam_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: steps.append(1) or adam_step(self, *a, **k))
    resumed = Trainer(job(tiny_dataset, tmp_path, **{"training.steps": "4"}))
    assert resumed.loaded is not None and resumed.loaded.step == 2
    assert initialized == []
    assert steps == []  # no dummy optimizer step to create Adam's state
    got = weights(resumed)
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    state = resumed.optimizers[0].state_dict()["state"]
    assert {float(s["step"]) for s in state.values()} == {2.0}
    resumed.checkpointer.close()


def test_only_what_the_load_left_out_is_initialized(tiny_dataset, tmp_path, initialized):
    """With a partial load (dist_ckpt_strictness = log_unexpected and friends) the keys the
    checkpoint lacks get exactly a fresh run's values; the loaded ones are kept."""
    fresh = Trainer(job(tiny_dataset, tmp_path / "fresh", **{"checkpoint.enable": "false"}))
    reference = weights(fresh)
    trainer = Trainer(job(tiny_dataset, tmp_path / "run", **{"checkpoint.enable": "false"}))
    for param in trainer.params:
        param.data.fill_(7.0)
    initialized.clear()
    absent = ["model.norm.weight", "model.layers.1.attention.wq.weight"]
    trainer._init_weights(LoadResult(2, "somewhere", ["model"], absent, []))
    assert sorted(initialized) == sorted(k.partition(".")[2] for k in absent)
    got = weights(trainer)
    for key, value in got.items():
        if key == "rope":
            continue
        if f"model.{key}" in absent:
            assert torch.equal(value, reference[key]), key
        else:
            assert (value == 7.0).all(), key
    # Nothing loaded (or the model excluded from loading): every weight, as a fresh run.
    trainer._init_weights(LoadResult(2, "somewhere", ["optimizer"], [], []))
    got = weights(trainer)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_adam_state_is_what_its_first_step_creates():
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    ours = torch.optim.AdamW(params, foreach=True)
    init_adam_state(ours)
    theirs = torch.optim.AdamW(params, foreach=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    theirs.step()  # lazily creates the state, then counts the step
    for p in params:
        a, b = ours.state[p], theirs.state[p]
        assert set(a) == set(b) == {"step", "exp_avg", "exp_avg_sq"}
        assert a["step"].dtype == b["step"].dtype and a["step"].device == b["step"].device
        assert float(a["step"]) == 0.0 and float(b["step"]) == 1.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype


def test_a_fast_tier_file_lacking_a_tensor_fails_the_load():
    """The weights are not initialized before a load, so a key the file lacks must not be
    left as it is."""
    target = {"model": {"a": torch.zeros(2), "b": torch.zeros(2)}, "train_state": {"step": 1}}
    with pytest.raises(CheckpointError, match=r"lacks model\.\['b'\]"):
        _fill(target, {"model": {"a": torch.ones(2)}, "train_state": {"step": 3}})
    _fill(target, {"model": {"a": torch.ones(2), "b": torch.ones(2)},
                   "train_state": {"step": 3}})
    assert (target["model"]["b"] == 1).all() and target["train_state"]["step"] == 3
