"""Hugging Face and torch-file interop: `raytitan convert to-hf | from-hf | to-torch`,
`initial_load_in_hf`, `last_save_in_hf`, and PyTorch's own `dcp_to_torch` on our steps.

One trained debug checkpoint (the Trainer in this process, a world-1 gloo group) is the
reference: every export must reproduce its loss (bitwise) or logits (HF: <= 1e-4)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raytitan.checkpoint import CheckpointError
from raytitan.cli import main as cli_main
from raytitan.config import ConfigError, load_job_config
from raytitan.interop.hf import HFExport, model_entries, read_model_tensors
from raytitan.models.llama3 import Llama3
from raytitan.models.llama3.hf import check_hf_config, flavor_args, hf_config, to_hf_name
from raytitan.train import Trainer, cross_entropy
from tests.conftest import BASE_OVERRIDES, ROOT, overrides_to_argv

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("world_of_one")


def job(tiny_dataset: str, dump: Path, **overrides: str):
    argv = overrides_to_argv({**BASE_OVERRIDES, "data.path": tiny_dataset,
                              "job.dump_folder": str(dump), "checkpoint.enable": "true",
                              **overrides})
    return load_job_config(None, argv)


def debug_model(weights: dict[str, torch.Tensor], vocab: int) -> Llama3:
    model = Llama3(dataclasses.replace(flavor_args("debug", vocab), max_seq_len=64))
    model.load_state_dict(weights, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """A debug model trained 4 steps; its step-4, fixed tokens and raytitan's logits/loss."""
    dump = tmp_path_factory.mktemp("trained")
    trainer = Trainer(job(tiny_dataset, dump, **{"training.steps": "4",
                                                 "checkpoint.interval": "4"}))
    trainer.train()
    model = trainer.model_parts[0].eval()
    vocab = model.args.vocab_size
    tokens = torch.randint(0, vocab, (2, 65), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    step = dump / "checkpoint" / "raytitan" / "step-4"
    return {"step": step, "tokens": tokens, "logits": logits, "vocab": vocab,
            "loss": cross_entropy(logits, tokens[:, 1:]), "dataset": tiny_dataset}


def loss_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])


def step_model(step: Path) -> dict[str, torch.Tensor]:
    entries = model_entries(str(step), {})
    return read_model_tensors(str(step), {}, entries, sorted(entries))


def convert(*argv: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["convert", *argv])
    assert exit_info.value.code == 0


# -- to-hf / from-hf ----------------------------------------------------------------------


def test_to_hf_then_from_hf_is_bitwise(trained, tmp_path):
    hf, back = tmp_path / "hf", tmp_path / "back"
    convert("to-hf", str(trained["step"]), str(hf), "--max-shard-size", "0.004")
    shards = sorted(p.name for p in hf.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in step_model(trained["step"]).values())

    convert("from-hf", str(hf), str(back), "--flavor", "debug")
    original, restored = step_model(trained["step"]), step_model(back / "step-0")
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    commit = json.loads((back / "step-0" / "COMMIT.json").read_text())
    assert commit["model_only"] and commit["flavor"] == "debug"
    assert (back / "step-0" / "tokenizer" / "tokenizer.json").exists()


def test_transformers_loads_the_export_with_equal_logits(trained, tmp_path):
    from tokenizers import Tokenizer

    hf = tmp_path / "hf"
    convert("to-hf", str(trained["step"]), str(hf), "--max-shard-size", "0.004")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        logits = model(trained["tokens"][:, :-1]).logits
    assert (logits - trained["logits"]).abs().max() <= 1e-4

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    ours = Tokenizer.from_file(f"{trained['dataset']}/tokenizer.json")
    text = "def f(x):\n    return x + 1  # the Python language reference"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text).ids
    assert tokenizer.eos_token_id == model.config.eos_token_id == ours.token_to_id(
        "<|end_of_text|>")


def test_export_split_over_ranks_equals_one_process(trained, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    plan = dict(max_shard_bytes=4_000_000, dtype="bfloat16")
    HFExport.plan(str(trained["step"]), str(one), **plan).run({})
    split = HFExport.plan(str(trained["step"]), str(two), **plan)
    written = {**split.write_shards(1, 2), **split.write_shards(0, 2), **split.write_rest({})}
    assert sorted(written) == sorted(p.name for p in one.iterdir())
    for name in written:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert len(split.files) >= 2  # so both ranks wrote files
    tensors = load_file(two / split.file_name(1))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_to_hf_needs_a_flavor_that_fits(trained, tmp_path):
    with pytest.raises(ValueError, match=r"not flavor '1B' \(\d+ tensors differ\): "
                                         r"layers.0.attention.wk.weight: stored \(128, 256\)"):
        HFExport.plan(str(trained["step"]), str(tmp_path / "x"), flavor="1B")


def test_conversions_refuse_uncommitted_or_damaged_steps(trained, tmp_path):
    import shutil

    step = tmp_path / "run" / "step-4"
    shutil.copytree(trained["step"], step)
    (step / "__0_0.distcp").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match=r"step-4 is damaged: __0_0.distcp has 4 bytes"):
        HFExport.plan(str(step), str(tmp_path / "out"))
    (step / "COMMIT.json").unlink()
    for argv in (["to-hf", str(step), str(tmp_path / "out")],
                 ["to-torch", str(step), str(tmp_path / "out.pt")]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["convert", *argv])
        assert exit_info.value.code == 2
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out").exists()


def test_conversions_never_overwrite(trained, tmp_path, capsys):
    hf, pt = tmp_path / "hf", tmp_path / "model.pt"
    convert("to-hf", str(trained["step"]), str(hf))
    convert("to-torch", str(trained["step"]), str(pt))
    convert("from-hf", str(hf), str(tmp_path / "c" / "step-7"), "--flavor", "debug")
    before = {p: p.read_bytes() for p in [*hf.iterdir(), pt]}
    for argv, message in ((["to-hf", str(trained["step"]), str(hf)], "is not empty"),
                          (["to-torch", str(trained["step"]), str(pt)], "exists"),
                          (["from-hf", str(hf), str(tmp_path / "c" / "step-7"), "--flavor",
                            "debug"], "step-7 exists")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["convert", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in before}


def test_hf_config_mismatch_names_fields_and_fitting_flavors():
    args = flavor_args("debug", 512)
    config = hf_config(args, dtype="float32", bos_token_id=0, eos_token_id=1)
    check_hf_config(config, args, "debug", "x")  # its own config fits
    with pytest.raises(ValueError, match=r"hidden_size 256 != 2048.*Flavors with this "
                                         r"structure: \['debug'\]"):
        check_hf_config(config, flavor_args("1B", 512), "1B", "x")
    transformers_5 = {**config, "rope_parameters": {**config.pop("rope_scaling"),
                                                    "rope_theta": config.pop("rope_theta")}}
    check_hf_config(transformers_5, args, "debug", "x")  # the 5.x form reads the same
    with pytest.raises(ValueError, match="vocab_size 999 != 512"):
        check_hf_config({**transformers_5, "vocab_size": 999}, args, "debug", "x")


# -- initial_load_in_hf -------------------------------------------------------------------


def random_hf_llama(folder: Path, vocab: int) -> torch.nn.Module:
    """A transformers-made random Llama with the debug flavor's shapes, saved to `folder`."""
    args = flavor_args("debug", vocab)
    config = transformers.LlamaConfig(**{
        k: v for k, v in hf_config(args, dtype="float32", bos_token_id=None,
                                   eos_token_id=None).items()
        if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def test_initial_load_in_hf_starts_from_transformers_weights(trained, tmp_path):
    hf_model = random_hf_llama(tmp_path / "hf", trained["vocab"])
    trainer = Trainer(job(trained["dataset"], tmp_path / "run", **{
        "training.steps": "1", "checkpoint.initial_load_in_hf": "true",
        "model.hf_assets_path": str(tmp_path / "hf")}))
    tokens = trained["tokens"]
    ours = trainer.model_parts[0]
    with torch.no_grad():
        diff = (ours(tokens[:, :-1]) - hf_model(tokens[:, :-1]).logits).abs().max()
    assert diff <= 1e-4
    # The first training step's loss is transformers' loss on the same batch.
    batch = trainer.stream.next_batch().tokens
    with torch.no_grad():
        hf_loss = cross_entropy(hf_model(batch[:, :-1]).logits, batch[:, 1:])
    loss, _ = trainer.train_step(batch)
    assert abs(loss.item() - hf_loss.item()) <= 1e-5


def test_initial_load_in_hf_needs_a_folder_that_fits(trained, tmp_path):
    with pytest.raises(ConfigError, match="set model.hf_assets_path"):
        Trainer(job(trained["dataset"], tmp_path / "a",
                    **{"checkpoint.initial_load_in_hf": "true"}))
    with pytest.raises(CheckpointError, match="is not a Hugging Face model folder"):
        Trainer(job(trained["dataset"], tmp_path / "b", **{
            "checkpoint.initial_load_in_hf": "true", "model.hf_assets_path": str(tmp_path)}))
    random_hf_llama(tmp_path / "hf", trained["vocab"] + 1)
    with pytest.raises(CheckpointError, match=r"vocab_size 513 != 512"):
        Trainer(job(trained["dataset"], tmp_path / "c", **{
            "checkpoint.initial_load_in_hf": "true",
            "model.hf_assets_path": str(tmp_path / "hf")}))


# -- last_save_in_hf ----------------------------------------------------------------------


def test_last_save_in_hf_is_part_of_the_committed_step(trained, tmp_path):
    trainer = Trainer(job(trained["dataset"], tmp_path, **{
        "training.steps": "2", "checkpoint.interval": "2", "checkpoint.last_save_in_hf": "true",
        "checkpoint.last_save_model_only": "true", "checkpoint.export_dtype": "bfloat16"}))
    trainer.train()
    step = tmp_path / "checkpoint" / "raytitan" / "step-2"
    commit = json.loads((step / "COMMIT.json").read_text())
    assert commit["hf"] == "hf" and commit["dtype"] == "bfloat16"
    hf_files = {p.relative_to(step).as_posix() for p in (step / "hf").iterdir()}
    assert {"hf/config.json", "hf/model.safetensors.index.json", "hf/tokenizer.json",
            "hf/model-00001-of-00001.safetensors"} <= hf_files <= set(commit["files"])
    exported = load_file(step / "hf" / "model-00001-of-00001.safetensors")
    stored = step_model(step)  # the DCP copy, in export_dtype
    assert exported["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(exported[to_hf_name("layers.1.feed_forward.w2.weight")],
                       stored["layers.1.feed_forward.w2.weight"])
    model = transformers.AutoModelForCausalLM.from_pretrained(step / "hf")
    assert model.dtype == torch.bfloat16
    from raytitan.checkpoint import inspect

    assert "model bfloat16 +hf" in inspect.ls(str(step.parent), [])
    assert inspect.verify(str(step), [])[0]


def test_failed_hf_export_keeps_the_final_step(trained, tmp_path, monkeypatch):
    def fail(self, tokenizer_files):
        raise OSError("simulated upload failure")

    monkeypatch.setattr(HFExport, "write_rest", fail)
    trainer = Trainer(job(trained["dataset"], tmp_path, **{
        "training.steps": "2", "checkpoint.interval": "2",
        "checkpoint.last_save_in_hf": "true"}))
    with pytest.raises(CheckpointError, match=r"HF export of .*step-2 failed: .*simulated "
                                              r"upload failure.*step-2 is committed without it"):
        trainer.train()
    step = tmp_path / "checkpoint" / "raytitan" / "step-2"
    commit = json.loads((step / "COMMIT.json").read_text())
    assert "hf" not in commit and not (step / "hf").exists()
    assert not any(name.startswith("hf/") for name in commit["files"])


def test_hf_options_need_checkpointing(trained, tmp_path):
    for option in ("initial_load_in_hf", "last_save_in_hf"):
        with pytest.raises(ConfigError, match=f"checkpoint.{option} = true needs "
                                              "checkpoint.enable = true"):
            Trainer(job(trained["dataset"], tmp_path, **{
                "checkpoint.enable": "false", f"checkpoint.{option}": "true",
                "model.hf_assets_path": str(tmp_path)}))


# -- single torch files -------------------------------------------------------------------


def test_dcp_to_torch_output_loads_strictly_with_the_same_loss(trained, tmp_path):
    out = tmp_path / "full.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.checkpoint.format_utils",
                    "dcp_to_torch", str(trained["step"]), str(out)], check=True, cwd=ROOT,
                   capture_output=True)
    state = torch.load(out, weights_only=False)
    assert {"model", "optimizer", "train_state", "dataloader", "rng"} <= set(state)
    model = debug_model(state["model"], trained["vocab"])
    assert torch.equal(loss_of(model, trained["tokens"]), trained["loss"])


def test_to_torch_model_only_in_export_dtype(trained, tmp_path):
    out = tmp_path / "model.pt"
    convert("to-torch", str(trained["step"]), str(out))
    state = torch.load(out, weights_only=True)
    assert "layers.0.attention.wq.weight" in state  # Meta's names, flat
    assert torch.equal(loss_of(debug_model(state, trained["vocab"]), trained["tokens"]),
                       trained["loss"])

    out = tmp_path / "model-bf16.pt"
    convert("to-torch", str(trained["step"]), str(out), "--dtype", "bfloat16")
    state = torch.load(out, weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    model = debug_model(state, trained["vocab"]).to(torch.bfloat16)  # strict load
    assert abs(loss_of(model, trained["tokens"]).item() - trained["loss"].item()) < 0.05

    out = tmp_path / "full.pt"
    convert("to-torch", str(trained["step"]), str(out), "--full")
    state = torch.load(out, weights_only=False)
    assert state["train_state"] == {"step": 4, "tokens_seen": 4 * 8 * 64}


def test_tied_embeddings_export_and_load(tmp_path):
    """1B/3B tie the output to the embedding: HF gets no lm_head (tie_word_embeddings) and
    computes the same logits; loading it back fills the one shared matrix."""
    args = dataclasses.replace(flavor_args("debug", 300), tie_word_embeddings=True,
                               max_seq_len=32)
    torch.manual_seed(0)
    model = Llama3(args)
    model.init_weights(seed=3)
    step = tmp_path / "run" / "step-1"
    state = {k: v for k, v in model.state_dict().items()}
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": state}, checkpoint_id=str(step))
    export = HFExport.plan(str(step), str(tmp_path / "hf"), args=args, committed=False)
    export.run({})
    weights = load_file(tmp_path / "hf" / export.file_name(0))
    assert "lm_head.weight" not in weights
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - theirs(tokens).logits).abs().max() <= 1e-4

    # from-hf writes what a tied model's state dict holds, so a strict load works.
    from raytitan.interop.hf import import_hf
    from raytitan.models.llama3 import LLAMA3_FLAVORS

    LLAMA3_FLAVORS["tied-test"] = args
    try:
        step_url, _ = import_hf(str(tmp_path / "hf"), str(tmp_path / "back"), flavor="tied-test")
    finally:
        del LLAMA3_FLAVORS["tied-test"]
    loaded = Llama3(args)
    target = loaded.state_dict()
    dcp.load({"model": target}, checkpoint_id=step_url)
    for name, tensor in state.items():
        assert torch.equal(target[name], tensor), name
