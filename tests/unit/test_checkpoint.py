"""CheckpointManager in one process (a world-1 gloo group): commit protocol, damage
detection, selection of the step to load, every toggle, and the strictness modes."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import zlib

import pytest
import torch
from torch import nn

from raytitan.checkpoint import CheckpointError, CheckpointManager, CheckpointStorage
from raytitan.checkpoint.folder import open_folder
from raytitan.checkpoint.shards import StepWriter
from raytitan.checkpoint.storage import COMMIT_FILE
from raytitan.config import ConfigError
from raytitan.config.job_config import Checkpoint as CheckpointConfig
from tests.conftest import OPEN_MANAGERS

pytestmark = pytest.mark.usefixtures("world_of_one")


class Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class Run:
    """A tiny model + optimizer + states, trained a step at a time, with a manager."""

    def __init__(self, folder, *, model: nn.Module | None = None, seed: int = 0,
                 reported_step: int | None = None, **cfg):
        torch.manual_seed(seed)
        self.model = model or nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.train_state = Counter()
        self.dataloader = Counter()
        self.storage = CheckpointStorage(str(folder))
        self.cfg = CheckpointConfig(**{"enable": True, "interval": 1, **cfg})
        folder = open_folder(self.cfg, self.storage, job="test", reported_step=reported_step)
        self.ckpt = CheckpointManager(
            self.cfg, storage=self.storage, model_parts=[self.model], optimizers=[self.opt],
            states={"train_state": self.train_state, "dataloader": self.dataloader},
            files=lambda: {"run_config.toml": b"x = 1\n"}, folder=folder)
        OPEN_MANAGERS.append(self.ckpt)

    def step(self) -> None:
        loss = self.model(torch.randn(4, 8)).square().mean()
        loss.backward()
        self.ckpt.wait_for_staging()
        self.opt.step()
        self.opt.zero_grad()
        self.train_state.value += 1
        self.dataloader.value += 8

    def train_and_save(self, steps: int, **save_kwargs) -> None:
        for _ in range(steps):
            self.step()
        self.ckpt.save(self.train_state.value, **save_kwargs)
        self.ckpt.poll(wait=True)

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- save, commit, resume -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_resume_restores_everything_bitwise(tmp_path, mode):
    run = Run(tmp_path, async_mode=mode)
    run.train_and_save(3)
    weights, opt_state = run.weights(), copy.deepcopy(run.opt.state_dict())
    rng = torch.get_rng_state()
    run.step()  # diverge from the checkpoint in every way
    torch.manual_seed(123)

    resumed = Run(tmp_path, seed=7)
    result = resumed.ckpt.load()
    assert result.step == 3
    assert result.keys == ["dataloader", "model", "optimizer", "rng", "train_state"]
    assert same(resumed.weights(), weights)
    assert resumed.train_state.value == 3 and resumed.dataloader.value == 24
    assert torch.equal(torch.get_rng_state(), rng)
    for p, state in opt_state["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed.opt.state_dict()["state"][p][key], value), key


def test_commit_manifest_lists_every_file_with_size_and_crc(tmp_path):
    run = Run(tmp_path)
    run.train_and_save(1)
    step_dir = tmp_path / "step-1"
    commit = json.loads((step_dir / COMMIT_FILE).read_text())
    on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
               if p.is_file() and p.name != COMMIT_FILE}
    assert set(commit["files"]) == on_disk
    assert {".metadata", "checksums.json", "run_config.toml", "__0_0.distcp"} <= on_disk
    for name, entry in commit["files"].items():
        data = (step_dir / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["crc32"] == zlib.crc32(data), name  # shards: folded from their items
    assert commit["step"] == 1 and commit["world_size"] == 1 and not commit["model_only"]


def test_save_checksums_off_records_sizes_only(tmp_path):
    run = Run(tmp_path, save_checksums=False)
    run.train_and_save(1)
    commit = json.loads((tmp_path / "step-1" / COMMIT_FILE).read_text())
    assert all(set(entry) == {"size"} for entry in commit["files"].values())


@pytest.mark.parametrize("checksums", [True, False])
def test_torchs_zip_crc32_is_off_only_while_our_item_crc32s_are_recorded(tmp_path, checksums):
    """Every shard item is a torch.save zip. With save_checksums (the default) the writer
    records each item's CRC32 itself, so torch's own CRC32 of each zip record (a second pass
    over every byte that torch.load never checks) is off while the shards are written: the
    records carry CRC 0. With save_checksums = false torch's CRC32s are kept (zipfile checks
    them). Either way torch's setting is as before once the save is done."""
    import io
    import zipfile

    from torch.distributed.checkpoint import FileSystemReader

    run = Run(tmp_path, save_checksums=checksums)
    run.train_and_save(1)
    assert torch.serialization.get_crc32_options()
    step = tmp_path / "step-1"
    data = (step / "__0_0.distcp").read_bytes()
    crcs = []
    for info in FileSystemReader(str(step)).read_metadata().storage_data.values():
        item = zipfile.ZipFile(io.BytesIO(data[info.offset:info.offset + info.length]))
        crcs += [r.CRC for r in item.infolist() if "/data/" in r.filename]
        assert checksums or item.testzip() is None
    assert len(crcs) >= 2 and all((crc == 0) == checksums for crc in crcs), crcs


def test_crash_during_save_keeps_previous_step_latest(tmp_path, monkeypatch):
    run = Run(tmp_path)
    run.train_and_save(2)
    weights = run.weights()

    original = StepWriter.write_data

    def crash_midway(self, plan, planner):
        original(self, plan, planner)  # the shards are on disk ...
        raise OSError("simulated crash before the commit")

    monkeypatch.setattr(StepWriter, "write_data", crash_midway)
    with pytest.raises(CheckpointError, match="step-4 failed.*simulated crash"):
        run.train_and_save(2)
    monkeypatch.undo()
    assert (tmp_path / "step-4" / "__0_0.distcp").exists()
    assert not (tmp_path / "step-4" / COMMIT_FILE).exists()
    assert run.storage.committed_steps() == [2]

    resumed = Run(tmp_path, seed=1)
    assert resumed.ckpt.load().step == 2
    assert same(resumed.weights(), weights)
    assert not (tmp_path / "step-4").exists()  # the leftover is cleaned


def test_torn_commit_file_is_not_committed(tmp_path):
    run = Run(tmp_path)
    run.train_and_save(1)
    run.train_and_save(1)
    (tmp_path / "step-2" / COMMIT_FILE).write_text('{"step": 2, "fi')
    assert run.storage.committed_steps() == [1]
    assert Run(tmp_path).ckpt.load().step == 1


def test_truncated_shard_names_step_file_and_load_step(tmp_path):
    run = Run(tmp_path)
    run.train_and_save(1)
    run.train_and_save(1)
    shard = tmp_path / "step-2" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        Run(tmp_path).ckpt.load()
    assert "step-2" in str(e.value) and "__0_0.distcp" in str(e.value)
    assert "load_step" in str(e.value) and "[1]" in str(e.value)
    assert Run(tmp_path, load_step=1).ckpt.load().step == 1


def test_verify_integrity_catches_a_flipped_byte(tmp_path):
    run = Run(tmp_path)
    run.train_and_save(1)
    shard = tmp_path / "step-1" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    commit = json.loads((tmp_path / "step-1" / COMMIT_FILE).read_text())
    assert run.storage.check_sizes(1, commit) == []  # same size: only a checksum can tell
    with pytest.raises(CheckpointError, match=r"step-1.*__0_0.distcp has CRC32"):
        Run(tmp_path, verify_integrity=True).ckpt.load()


def test_keep_latest_k_deletes_oldest_committed_only(tmp_path):
    run = Run(tmp_path, keep_latest_k=2)
    for _ in range(4):
        run.train_and_save(1)
    assert run.storage.committed_steps() == [3, 4]


def test_saving_over_an_abandoned_step_moves_it_to_quarantine(tmp_path):
    run = Run(tmp_path)
    run.train_and_save(2)
    run.train_and_save(2)
    other = Run(tmp_path, load_step=2, load_rng=False, seed=3)  # other batches from step 2
    other.ckpt.load()
    other.train_and_save(2)  # a different step-4
    loaded = Run(tmp_path, seed=11)
    assert loaded.ckpt.load().step == 4
    assert same(loaded.weights(), other.weights())
    assert not same(loaded.weights(), run.weights())
    # The abandoned step-4 is not lost: it was moved aside, whole and still committed.
    [moved] = (tmp_path / "quarantine").iterdir()
    assert moved.name.startswith("step-4.")
    assert json.loads((moved / COMMIT_FILE).read_text())["step"] == 4


# -- which step is loaded -------------------------------------------------------------------


def test_load_step_missing_lists_committed_steps(tmp_path):
    run = Run(tmp_path)
    run.train_and_save(1)
    run.train_and_save(2)
    with pytest.raises(CheckpointError, match=r"load_step = 2.*committed steps: \[1, 3\]"):
        Run(tmp_path, load_step=2).ckpt.load()
    assert Run(tmp_path, load_step=1).ckpt.load().step == 1
    assert Run(tmp_path).ckpt.load().step == 3


def test_newest_committed_step_beats_rays_older_report(tmp_path):
    """Ray can lose the report of a step committed just before a crash."""
    run = Run(tmp_path)
    run.train_and_save(1)
    run.train_and_save(1)
    assert Run(tmp_path, reported_step=1).ckpt.load().step == 2
    assert Run(tmp_path, reported_step=7).ckpt.load().step == 2  # reported, not in storage


def test_going_back_to_an_older_step_starts_a_new_line(tmp_path):
    """After load_step = 1 the new commits are the latest, whatever their step numbers."""
    run = Run(tmp_path)
    for _ in range(3):
        run.train_and_save(1)  # steps 1, 2, 3
    branch = Run(tmp_path, load_step=1, load_rng=False, seed=5)
    branch.ckpt.load()
    branch.train_and_save(1)  # a new step-2, committed after step-3
    resumed = Run(tmp_path, seed=9)
    assert resumed.ckpt.load().step == 2
    assert same(resumed.weights(), branch.weights())
    assert run.storage.committed_steps() == [1, 2, 3]  # the old step-3 is still there


def test_only_model_only_exports_is_an_error_not_a_silent_restart(tmp_path):
    run = Run(tmp_path, last_save_model_only=True, keep_latest_k=1)
    run.train_and_save(1)
    run.train_and_save(1, final=True)
    assert run.storage.committed_steps() == [1, 2]  # retention keeps the newest full step
    run.storage.remove_step(1)
    with pytest.raises(CheckpointError, match=r"only model-only steps \[2\].*load_step"):
        Run(tmp_path).ckpt.load()


def test_seed_checkpoint_is_saved_in_float32_whatever_export_dtype(tmp_path):
    run = Run(tmp_path, export_dtype="bfloat16", last_save_model_only=True)
    run.ckpt.save(0, final=True, model_only=True)
    commit = json.loads((tmp_path / "step-0" / COMMIT_FILE).read_text())
    assert commit["dtype"] == "float32" and commit["keys"] == ["model"]
    assert Run(tmp_path).ckpt.load().step == 0


def test_storage_options_are_typed():
    from raytitan.checkpoint.storage import parse_storage_options

    assert parse_storage_options(["anon=false", "use_ssl=True", "max_concurrency=8",
                                  "endpoint_url=http://h:1/x=y"]) == {
        "anon": False, "use_ssl": True, "max_concurrency": 8,
        "endpoint_url": "http://h:1/x=y"}


def test_fresh_start_and_exit_on_missing_checkpoint(tmp_path):
    assert Run(tmp_path).ckpt.load() is None
    with pytest.raises(CheckpointError, match="exit_on_missing_checkpoint"):
        Run(tmp_path, exit_on_missing_checkpoint=True).ckpt.load()


def test_initial_load_path_and_its_precedence(tmp_path, caplog):
    source = Run(tmp_path / "pretrained", seed=5)
    source.train_and_save(2)
    weights = source.weights()

    fresh = Run(tmp_path / "run", initial_load_path=str(tmp_path / "pretrained" / "step-2"))
    result = fresh.ckpt.load()
    assert result.step == 2 and result.keys == ["model"]  # initial_load_model_only
    assert same(fresh.weights(), weights) and fresh.train_state.value == 0
    fresh.train_and_save(1)

    # Once the run has its own checkpoint, it resumes from it and says so loudly.
    with caplog.at_level(logging.WARNING, logger="raytitan"):
        again = Run(tmp_path / "run", initial_load_path=str(tmp_path / "pretrained" / "step-2"))
        assert again.ckpt.load().step == 1
    assert "IGNORED" in caplog.text

    full = Run(tmp_path / "run2", initial_load_path=str(tmp_path / "pretrained" / "step-2"),
               initial_load_model_only=False)
    assert full.ckpt.load().keys == ["dataloader", "model", "optimizer", "rng", "train_state"]
    with pytest.raises(CheckpointError, match="not a committed"):
        Run(tmp_path / "run3", initial_load_path=str(tmp_path / "nowhere" / "step-1")).ckpt.load()


def test_model_only_final_save_with_export_dtype(tmp_path):
    run = Run(tmp_path, last_save_model_only=True, export_dtype="bfloat16")
    run.train_and_save(1)
    run.train_and_save(1, final=True)
    commit = json.loads((tmp_path / "step-2" / COMMIT_FILE).read_text())
    assert commit["model_only"] and commit["dtype"] == "bfloat16" and commit["keys"] == ["model"]
    metadata = torch.distributed.checkpoint.FileSystemReader(
        str(tmp_path / "step-2")).read_metadata()
    keys = set(metadata.state_dict_metadata)
    assert all(k.startswith("model.") for k in keys)
    assert {metadata.state_dict_metadata[k].properties.dtype for k in keys} == {torch.bfloat16}
    # Resuming prefers the newest full-state step; the export is loaded only when asked for.
    assert Run(tmp_path).ckpt.load().step == 1
    loaded = Run(tmp_path, load_step=2)
    assert loaded.ckpt.load().keys == ["model"]
    for p, q in zip(loaded.weights(), run.weights(), strict=True):
        assert torch.equal(p, q.to(torch.bfloat16).float())


def test_load_only_never_saves(tmp_path):
    run = Run(tmp_path, load_only=True)
    assert not run.ckpt.should_save(1, 10) and not run.ckpt.should_save(10, 10)
    assert Run(tmp_path).ckpt.should_save(10, 10)


# -- toggles --------------------------------------------------------------------------------


def test_save_optim_and_save_rng_off(tmp_path):
    run = Run(tmp_path, save_optim=False, save_rng=False)
    run.train_and_save(1)
    keys = torch.distributed.checkpoint.FileSystemReader(
        str(tmp_path / "step-1")).read_metadata().state_dict_metadata
    assert not any(k.startswith(("optimizer.", "rng.")) for k in keys)
    fresh = Run(tmp_path, seed=2)
    assert fresh.ckpt.load().keys == ["dataloader", "model", "train_state"]
    assert fresh.opt.state_dict()["state"] == {}


def test_load_optim_off_keeps_a_fresh_optimizer(tmp_path):
    Run(tmp_path).train_and_save(2)
    fresh = Run(tmp_path, load_optim=False)
    assert "optimizer" not in fresh.ckpt.load().keys
    assert fresh.opt.state_dict()["state"] == {}


def test_load_rng_off_keeps_this_process_rng(tmp_path):
    Run(tmp_path).train_and_save(1)
    random.seed(99)
    run = Run(tmp_path, load_rng=False, seed=99)
    mine, mine_python = torch.get_rng_state(), random.getstate()
    run.ckpt.load()
    assert torch.equal(torch.get_rng_state(), mine) and random.getstate() == mine_python


@pytest.mark.parametrize("excluded", ["dataloader", "train_state", "optimizer", "model"])
def test_exclude_from_loading(tmp_path, excluded):
    source = Run(tmp_path)
    source.train_and_save(2)
    run = Run(tmp_path, exclude_from_loading=[excluded], seed=4)
    before = run.weights()
    assert excluded not in run.ckpt.load().keys
    if excluded == "dataloader":
        assert run.dataloader.value == 0 and run.train_state.value == 2
    if excluded == "train_state":
        assert run.train_state.value == 0 and run.dataloader.value == 16
    if excluded == "optimizer":
        assert run.opt.state_dict()["state"] == {}
    if excluded == "model":
        assert same(run.weights(), before)


def test_exclude_from_loading_is_validated():
    with pytest.raises(ConfigError, match="lr_schedular.*lr_scheduler"):
        CheckpointConfig(exclude_from_loading=["lr_schedular"])


# -- strictness ---------------------------------------------------------------------------


def _wider_model() -> nn.Module:
    """The Run model plus one parameter the checkpoint does not have."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model.register_parameter("extra", nn.Parameter(torch.ones(3)))
    return model


def _narrower_model() -> nn.Module:
    """The Run model without the last layer's bias (a key of the checkpoint nobody asks for)."""
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))


@pytest.mark.parametrize("mode", ["log_unexpected", "log_all", "return_unexpected",
                                  "return_all", "ignore_all"])
def test_strictness_modes_that_load_what_matches(tmp_path, mode):
    source = Run(tmp_path)
    source.train_and_save(1)
    run = Run(tmp_path, model=_wider_model(), dist_ckpt_strictness=mode, load_optim=False)
    result = run.ckpt.load()
    assert result.unexpected == ["model.extra"]
    assert torch.equal(run.model.extra, torch.ones(3))
    assert torch.equal(run.model[0].weight, source.model[0].weight)


def test_skipped_keys_keep_their_init_in_the_optimizer_too(tmp_path):
    """A parameter the checkpoint lacks also lacks optimizer state: both keep their init."""
    Run(tmp_path).train_and_save(1)
    run = Run(tmp_path, model=_wider_model(), dist_ckpt_strictness="log_unexpected")
    result = run.ckpt.load()
    assert "model.extra" in result.unexpected
    assert "optimizer.state.extra.exp_avg" in result.unexpected
    assert torch.equal(run.model.extra, torch.ones(3))
    run.step()  # the optimizer works on the mixed state


def test_strictness_missing_keys_only_reported_by_all_modes(tmp_path):
    Run(tmp_path).train_and_save(1)
    assert Run(tmp_path, model=_narrower_model(), load_optim=False,
               dist_ckpt_strictness="return_all").ckpt.load().missing == ["model.2.bias"]
    assert Run(tmp_path, model=_narrower_model(), load_optim=False,
               dist_ckpt_strictness="return_unexpected").ckpt.load().missing == []
    with pytest.raises(CheckpointError, match="raise_all.*model.2.bias"):
        Run(tmp_path, model=_narrower_model(), load_optim=False,
            dist_ckpt_strictness="raise_all").ckpt.load()
    # raise_unexpected does not mind keys nobody asked for.
    Run(tmp_path, model=_narrower_model(), load_optim=False,
        dist_ckpt_strictness="raise_unexpected").ckpt.load()


@pytest.mark.parametrize("mode", ["raise_unexpected", "raise_all", "assume_ok_unexpected"])
def test_strictness_modes_that_fail_on_unexpected(tmp_path, mode):
    Run(tmp_path).train_and_save(1)
    with pytest.raises(CheckpointError, match=f"{mode}.*extra"):
        Run(tmp_path, model=_wider_model(), dist_ckpt_strictness=mode,
            load_optim=False).ckpt.load()


def test_storage_rejects_step_dirs_it_does_not_own(tmp_path):
    os.makedirs(tmp_path / "step-x")
    os.makedirs(tmp_path / "notes")
    run = Run(tmp_path)
    run.train_and_save(1)
    assert [s.step for s in run.storage.list_steps()] == [1]


# -- raytitan ckpt ------------------------------------------------------------------------


def ckpt_cli(*args: str) -> int:
    from raytitan.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ckpt", *args])
    return e.value.code


def test_ckpt_ls_show_verify(tmp_path, capsys):
    run = Run(tmp_path)
    run.train_and_save(1)
    run.train_and_save(1)
    (tmp_path / "step-9").mkdir()
    (tmp_path / "step-9" / "__0_0.distcp").write_bytes(b"partial")

    assert ckpt_cli("ls", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "UNCOMMITTED" in out and "committed *" in out and "(step 2)" in out

    assert ckpt_cli("show", str(tmp_path / "step-2")) == 0
    out = capsys.readouterr().out
    assert "train_state: {'value': 2}" in out and "dataloader: {'value': 16}" in out
    assert "model.0.weight  [16, 8]  float32" in out

    assert ckpt_cli("verify", str(tmp_path / "step-2")) == 0
    assert "OK" in capsys.readouterr().out
    shard = tmp_path / "step-2" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ckpt_cli("verify", str(tmp_path / "step-2")) == 1
    err = capsys.readouterr().err
    assert "DAMAGED" in err and "__0_0.distcp has CRC32" in err
    assert ckpt_cli("verify", str(tmp_path / "step-9")) == 1
    assert "not a committed step" in capsys.readouterr().err
    assert ckpt_cli("show", str(tmp_path)) == 2  # not a step directory
    assert "is not a step directory" in capsys.readouterr().err


def test_crc32_is_zlibs():
    """Our CRC32 (ISA-L's where installed) gives zlib.crc32's values, also continued from a
    running value and over a memoryview: checkpoints stay readable either way."""
    from raytitan.checkpoint.crc import crc32

    data = random.Random(0).randbytes(3 << 20)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)[7:], 12345) == zlib.crc32(data[7:], 12345)
    assert crc32(b"") == 0


@pytest.mark.parametrize(("n1", "n2"), [(0, 0), (0, 7), (7, 0), (1, 1), (4096, 3), (5, 1 << 20)])
def test_crc32_combine_equals_the_crc_of_the_concatenation(n1, n2):
    from raytitan.checkpoint.crc import crc32_combine

    a, b = os.urandom(n1), os.urandom(n2)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(a + b)


# -- save plans (issue 11) ------------------------------------------------------------------


def test_cached_save_plans_write_identical_files_and_replan_on_a_new_structure(tmp_path):
    """ckpt_assume_constant_structure: a save of an unchanged structure reuses the cached
    plan (DCP's cache, under raytitan's key) and writes the same shard bytes as an uncached
    save of the same state; a changed structure (a layer added to the model) is
    re-planned; a model-only save has a plan of its own; every step loads whole."""
    from torch.distributed.checkpoint.planner import SavePlanner

    for cache in (SavePlanner._cached_save_plan, SavePlanner._cached_all_plans):
        for key in [k for k in cache if k.startswith("raytitan:")]:
            del cache[key]

    def shards(run, step):
        files = json.loads(open(run.storage.step_path(step, "checksums.json")).read())
        return {name: entry[:2] for name, entry in files.items() if name.endswith(".distcp")}

    def saves(run) -> list:
        plans = []
        for step in (1, 2, 3):
            if step == 2:
                run.step()
                run.model.append(nn.Linear(4, 4))  # a new structure
            run.ckpt.save(step)
            run.ckpt.poll(wait=True)
            plans.append(SavePlanner._cached_save_plan.get("raytitan:full-float32"))
        return plans

    cached = Run(tmp_path / "cached", ckpt_assume_constant_structure=True)
    plans = saves(cached)
    weights = cached.weights()
    assert plans[0] is not None and plans[1] is not plans[0]  # re-planned on the change
    assert plans[2] is plans[1]  # unchanged: the cached plan
    plain = Run(tmp_path / "plain")  # the same seed and steps, no cache
    assert all(plan is plans[1] for plan in saves(plain))  # it never touches the cache
    assert [shards(cached, s) for s in (1, 2, 3)] == [shards(plain, s) for s in (1, 2, 3)]
    assert shards(cached, 2) == shards(cached, 3)

    cached.ckpt.save(4, model_only=True)
    cached.ckpt.poll(wait=True)
    assert "raytitan:model-float32" in SavePlanner._cached_save_plan
    assert SavePlanner._cached_save_plan["raytitan:full-float32"] is plans[1]
    grown = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 4))
    resumed = Run(tmp_path / "cached", model=grown, seed=5, load_step=3, load_optim=False)
    assert resumed.ckpt.load().step == 3
    assert same(resumed.weights(), weights)


def test_thread_count_writes_a_file_per_thread_and_loads_bitwise(tmp_path):
    run = Run(tmp_path, thread_count=2)
    run.train_and_save(2)
    weights = run.weights()
    shards = sorted(n for n in os.listdir(run.storage.step_path(2)) if n.endswith(".distcp"))
    assert shards == ["__0_0.distcp", "__0_1.distcp"]
    resumed = Run(tmp_path, seed=3, thread_count=2)  # read in 2 threads, CRC32s checked
    assert resumed.ckpt.load().step == 2
    assert same(resumed.weights(), weights)
    assert resumed.ckpt.loader.last_read_bytes == sum(  # every item of both files, once
        os.path.getsize(os.path.join(run.storage.step_path(2), name)) for name in shards)


def test_state_dicts_survey_the_model_once_and_follow_replaced_parameters(monkeypatch):
    """StepContents builds the model and optimizer state dicts as DCP's public functions
    do, surveying each part (DCP's _verify_options) once, not at every save; the states
    still follow a part whose parameters were replaced (a load may assign new ones)."""
    from torch.distributed.checkpoint import state_dict as dcp_state_dict
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from raytitan.checkpoint.state import StepContents

    surveys = []
    verify = dcp_state_dict._verify_options
    monkeypatch.setattr(dcp_state_dict, "_verify_options",
                        lambda *a, **k: surveys.append(1) or verify(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    contents = StepContents([model], [opt], {}, 0)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)

    def check() -> None:
        for ours, theirs in ((contents.merged_state("model"), get_model_state_dict(model)),
                             (contents.merged_state("optimizer"),
                              get_optimizer_state_dict(model, opt, options=flat))):
            assert ours.keys() == theirs.keys()
            for key, value in theirs.items():
                assert (torch.equal(ours[key], value) if isinstance(value, torch.Tensor)
                        else ours[key] == value), key

    check()
    count = len(surveys)
    for _ in range(3):
        contents.merged_state("model")
        contents.merged_state("optimizer")
    assert len(surveys) == count  # no survey per save
    new = nn.Parameter(torch.ones(3, 4))  # a part's parameter replaced, in the optimizer too
    opt.state[new] = opt.state.pop(model[0].weight)
    opt.param_groups[0]["params"][0] = new
    model[0].weight = new
    check()
    assert torch.equal(contents.merged_state("model")["0.weight"], torch.ones(3, 4))
