"""Hugging Face safetensors folders and single torch files, in and out of raytitan steps.

    HFExport        a committed step's model -> an HF `LlamaForCausalLM` folder on any
                    filesystem (ranks split the shard files; remote files are written locally,
                    then uploaded). Used by `raytitan convert to-hf` and `last_save_in_hf`.
    HFStepExport    `last_save_in_hf` for the CheckpointManager (its StepExport).
    HFCheckpoint    lazy, per-tensor reads of a local HF folder (`initial_load_in_hf`,
                    `raytitan convert from-hf`).
    HFInitialLoad   `initial_load_in_hf` for the CheckpointManager (its InitialLoad).
    import_hf       an HF folder -> a committed model-only step (an `initial_load_path`).
    step_to_torch   a step -> one `torch.save` file (model only: Meta/torchtune names).

An exported folder:
    config.json  tokenizer.json  tokenizer_config.json  special_tokens_map.json
    model-00001-of-0000N.safetensors ...      tensors in model order, <= max_shard_bytes each
    model.safetensors.index.json              written last: a folder without it is incomplete

Reading a step needs no process group: `dcp.load(no_dist=True)` reads the tensors asked for,
each shard file of the export on its own, so memory stays near one shard file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import tempfile
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from raytitan.checkpoint.manager import TOKENIZER_FILES
from raytitan.checkpoint.shards import StepWriter, step_reader
from raytitan.checkpoint.storage import (
    CheckpointError,
    CheckpointStorage,
    _is_local,
    crc32,
    file_crc,
    split_step_dir,
    write_bytes,
)
from raytitan.config.job_config import EXPORT_DTYPES
from raytitan.data.tokenizer import BOS, EOS
from raytitan.models.llama3.hf import (
    check_hf_config,
    flavor_args,
    from_hf_name,
    from_hf_tensor,
    hf_config,
    param_names,
    param_shapes,
    to_hf_name,
    to_hf_tensor,
)
from raytitan.models.llama3.model import Llama3Args

logger = logging.getLogger("raytitan")

SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


@contextlib.contextmanager
def _single_process():
    """DCP without a process group, minus its warning that it assumes just that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*in a single process", category=UserWarning)
        yield


def _dtype(name: str) -> torch.dtype:
    if name not in EXPORT_DTYPES:
        raise ValueError(f"dtype {name!r} is not valid; choose one of {list(EXPORT_DTYPES)}")
    return getattr(torch, name)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- reading a step's model ---------------------------------------------------------------


def check_committed(step_url: str, options: dict) -> dict:
    """Raise CheckpointError unless `step_url` is a committed step with every file whole
    (present, of the recorded size): an interrupted save is never converted."""
    parent, step = split_step_dir(step_url)
    storage = CheckpointStorage(parent, options)
    commit = storage.read_commit(step)
    if commit is None:
        raise CheckpointError(
            f"{step_url} is not a committed step (no readable COMMIT.json: an interrupted "
            f"save?); committed steps in {parent}: {storage.committed_steps() or 'none'}")
    if problems := storage.check_sizes(step, commit):
        raise CheckpointError(f"{step_url} is damaged: {'; '.join(problems[:5])}")
    return commit


def model_entries(step_url: str, options: dict) -> dict[str, TensorStorageMetadata]:
    """Shape and dtype of every model tensor of a step, by raytitan name."""
    metadata = step_reader(step_url, options).read_metadata()
    return {key.removeprefix("model."): meta
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}


def read_model_tensors(step_url: str, options: dict, entries: dict[str, TensorStorageMetadata],
                       names: list[str]) -> dict[str, torch.Tensor]:
    """The full tensors `names` of a step's model, in their stored dtype (no process group)."""
    model = {name: torch.empty(tuple(entries[name].size), dtype=entries[name].properties.dtype)
             for name in names}
    with _single_process():
        dcp.load({"model": model}, storage_reader=step_reader(step_url, options), no_dist=True)
    return model


def step_model_args(step_url: str, options: dict, entries: dict[str, TensorStorageMetadata],
                    flavor: str | None = None, commit: dict | None = None
                    ) -> tuple[Llama3Args, str]:
    """The model args of a step: its flavor (given, else from its `commit` manifest or
    run_config.toml) with the vocabulary its embedding has; every stored shape is checked
    against them."""
    parent, step = split_step_dir(step_url)
    storage = CheckpointStorage(parent, options)
    if flavor is None:
        flavor = (commit or {}).get("flavor")
    if flavor is None:
        try:
            with storage.fs.open(storage.step_path(step, "run_config.toml"), "rb") as f:
                flavor = tomllib.load(f).get("model", {}).get("flavor")
        except (FileNotFoundError, tomllib.TOMLDecodeError):
            pass
    if flavor is None:
        raise ValueError(f"{step_url} records no model flavor (no run_config.toml): pass "
                         "--flavor")
    if "tok_embeddings.weight" not in entries:
        raise CheckpointError(f"{step_url} holds no model (no model.tok_embeddings.weight)")
    args = flavor_args(flavor, int(entries["tok_embeddings.weight"].size[0]))
    expected = param_shapes(args)
    stored = {name: tuple(meta.size) for name, meta in entries.items()}
    if args.tie_word_embeddings:
        stored.pop("output.weight", None)  # a tied output is the embedding
    problems = sorted(f"{name}: stored {stored.get(name)}, flavor {expected.get(name)}"
                      for name in set(expected) | set(stored)
                      if stored.get(name) != expected.get(name))
    if problems:
        raise ValueError(f"the model of {step_url} is not flavor {flavor!r} ({len(problems)} "
                         f"tensors differ): {'; '.join(problems[:4])}"
                         f"{' ...' if len(problems) > 4 else ''}; pass the right --flavor")
    return args, flavor


# -- writing files to a local or remote folder --------------------------------------------


class _Folder:
    """A destination folder: local files are written in place and fsync'd; remote ones are
    written to a local temp folder, then uploaded and deleted."""

    def __init__(self, url: str, options: dict) -> None:
        self.url = url.rstrip("/") or "/"
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self.local = _is_local(self.fs)
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def put(self, name: str, write: Callable[[str], None]) -> dict:
        """Write file `name` with `write(local_path)`; returns {size, crc32}."""
        if self.local:
            path = os.path.join(self.root, name)
            write(path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            return {"size": os.path.getsize(path), "crc32": file_crc(self.fs, path)}
        with tempfile.TemporaryDirectory(prefix="raytitan-export-") as tmp:
            path = os.path.join(tmp, name)
            write(path)
            entry = {"size": os.path.getsize(path), "crc32": file_crc(fsspec.filesystem("file"),
                                                                      path)}
            self.fs.put_file(path, f"{self.root}/{name}")
        return entry

    def put_bytes(self, name: str, data: bytes) -> dict:
        write_bytes(self.fs, f"{self.root}/{name}", data)
        return {"size": len(data), "crc32": crc32(data)}

    def is_empty(self) -> bool:
        self.fs.invalidate_cache(self.root)
        return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self.root)
        return self.fs.exists(f"{self.root}/{name}")


def _json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


# -- export: step -> HF folder ------------------------------------------------------------


@dataclass
class HFExport:
    """The plan of one export: which tensors go into which file, in which dtype. Every rank
    of a training run computes the same plan from the step's metadata."""

    step_url: str
    out_url: str
    args: Llama3Args
    dtype: torch.dtype
    files: list[list[str]]
    """raytitan names per safetensors file, in model order."""
    entries: dict[str, TensorStorageMetadata]
    options: dict
    out_options: dict

    @classmethod
    def plan(cls, step_url: str, out_url: str, *, options: dict | None = None,
             out_options: dict | None = None, flavor: str | None = None,
             args: Llama3Args | None = None, dtype: str | None = None,
             max_shard_bytes: int = MAX_SHARD_BYTES, committed: bool = True) -> HFExport:
        """`committed`: the step must be committed and whole (False while the final save
        of a run is being committed with its export)."""
        options = options or {}
        commit = check_committed(step_url, options) if committed else None
        entries = model_entries(step_url, options)
        if args is None:
            args, _ = step_model_args(step_url, options, entries, flavor, commit)
        names = param_names(args)
        missing = [name for name in names if name not in entries]
        if missing:
            raise CheckpointError(f"{step_url} lacks model tensors {missing[:4]}")
        out_dtype = (_dtype(dtype) if dtype
                     else entries["tok_embeddings.weight"].properties.dtype)
        files: list[list[str]] = [[]]
        size = 0
        for name in names:
            nbytes = out_dtype.itemsize * int(torch.Size(entries[name].size).numel())
            if files[-1] and size + nbytes > max_shard_bytes:
                files.append([])
                size = 0
            files[-1].append(name)
            size += nbytes
        return cls(step_url, out_url, args, out_dtype, files, entries, options,
                   out_options if out_options is not None else options)

    def file_name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"

    def write_shards(self, rank: int = 0, world_size: int = 1) -> dict[str, dict]:
        """Write the safetensors files of this rank (every world_size-th); {name: entry}."""
        from safetensors.torch import save_file

        folder = _Folder(self.out_url, self.out_options)
        written = {}
        for i in range(rank, len(self.files), world_size):
            tensors = read_model_tensors(self.step_url, self.options, self.entries,
                                         self.files[i])
            hf = {to_hf_name(name): to_hf_tensor(name, t, self.args).to(self.dtype).contiguous()
                  for name, t in tensors.items()}
            name = self.file_name(i)
            written[name] = folder.put(
                name, lambda path, hf=hf: save_file(hf, path, metadata={"format": "pt"}))
            del tensors, hf
        return written

    def write_rest(self, tokenizer_files: dict[str, bytes]) -> dict[str, dict]:
        """config.json, the tokenizer files, and (last) the index; {name: entry}."""
        folder = _Folder(self.out_url, self.out_options)
        missing = [self.file_name(i) for i in range(len(self.files))
                   if not folder.exists(self.file_name(i))]
        if missing:
            raise CheckpointError(f"export to {self.out_url}: {missing} were not written")
        tokenizer = hf_tokenizer_files(tokenizer_files, self.args.max_seq_len)
        bos, eos = _special_ids(tokenizer.get("tokenizer.json"))
        written = {"config.json": folder.put_bytes("config.json", _json(hf_config(
            self.args, dtype=_dtype_name(self.dtype), bos_token_id=bos, eos_token_id=eos)))}
        for name, data in tokenizer.items():
            written[name] = folder.put_bytes(name, data)
        weight_map = {to_hf_name(name): self.file_name(i)
                      for i, names in enumerate(self.files) for name in names}
        total = sum(self.dtype.itemsize * int(torch.Size(self.entries[name].size).numel())
                    for names in self.files for name in names)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        written[SAFETENSORS_INDEX] = folder.put_bytes(SAFETENSORS_INDEX, _json(index))
        return written

    def run(self, tokenizer_files: dict[str, bytes]) -> dict[str, dict]:
        """The whole export in this process, into a new or empty folder (never over
        another export, which could leave a mix of both that looks whole)."""
        if not _Folder(self.out_url, self.out_options).is_empty():
            raise FileExistsError(f"{self.out_url} exists and is not empty; choose another "
                                  "output folder or delete it")
        return {**self.write_shards(), **self.write_rest(tokenizer_files)}


class HFStepExport:
    """last_save_in_hf: the final step of a run, also as a Hugging Face folder <step>/hf,
    written before the step's commit (which covers its files).

    Args:
        flavor: the model flavor (its args: max_position_embeddings is the flavor's, not
            training.seq_len).
        dtype: the export dtype (checkpoint.export_dtype).
        options: the checkpoint folder's storage options.
    """

    dirname = "hf"

    def __init__(self, flavor: str, dtype: str, options: dict) -> None:
        self.flavor, self.dtype, self.options = flavor, dtype, options
        self._plan: HFExport | None = None

    def _new_plan(self, step_url: str) -> HFExport:
        # Every rank plans alike from the step's metadata (the step is not committed yet).
        self._plan = HFExport.plan(step_url, f"{step_url}/{self.dirname}", options=self.options,
                                   flavor=self.flavor, dtype=self.dtype, committed=False)
        return self._plan

    def write_shards(self, step_url: str, rank: int, world_size: int) -> dict[str, dict]:
        """This rank's safetensors files; {name in hf/: {size, crc32}}."""
        return self._new_plan(step_url).write_shards(rank, world_size)

    def write_rest(self, step_url: str, tokenizer_files: dict[str, bytes]
                   ) -> dict[str, dict]:
        """config.json, the tokenizer files and (last) the index, by the plan write_shards
        made for this step; {name in hf/: {size, crc32}}."""
        plan = self._plan if self._plan and self._plan.step_url == step_url else \
            self._new_plan(step_url)
        return plan.write_rest(tokenizer_files)


def hf_tokenizer_files(files: dict[str, bytes], max_length: int) -> dict[str, bytes]:
    """The tokenizer files of an HF folder: those given, plus a tokenizer_config.json and
    special_tokens_map.json for a bare tokenizer.json (raytitan's own BPE), so that
    `AutoTokenizer` loads it as a fast tokenizer with Llama-3's BOS/EOS."""
    out = dict(files)
    if "tokenizer.json" not in out or "tokenizer_config.json" in out:
        return out
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(out["tokenizer.json"].decode())
    special = {role: token for role, token in (("bos_token", BOS), ("eos_token", EOS))
               if tok.token_to_id(token) is not None}
    out["tokenizer_config.json"] = _json({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        **special,
    })
    out.setdefault("special_tokens_map.json", _json(special))
    return out


def _special_ids(tokenizer_json: bytes | None) -> tuple[int | None, int | None]:
    if tokenizer_json is None:
        return None, None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json.decode())
    return tok.token_to_id(BOS), tok.token_to_id(EOS)


def step_tokenizer_files(step_url: str, options: dict) -> dict[str, bytes]:
    """The tokenizer assets a step carries (<step>/tokenizer/*), by file name."""
    fs, root = fsspec.core.url_to_fs(f"{step_url.rstrip('/')}/tokenizer", **options)
    if not fs.isdir(root):
        return {}
    return {posixpath.basename(p): fs.cat_file(p) for p in fs.ls(root, detail=False)}


# -- import: HF folder -> step ------------------------------------------------------------


class HFCheckpoint:
    """A local HF safetensors folder, read one tensor at a time (memory-mapped)."""

    def __init__(self, folder: str) -> None:
        if "://" in folder and not folder.startswith("file://"):
            raise ValueError(f"HF folder {folder!r} must be on local disk (copy it first, e.g. "
                             "`aws s3 sync`)")
        self.folder = folder.removeprefix("file://")
        config_path = os.path.join(self.folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} does not exist: {folder!r} is not a Hugging "
                                    "Face model folder")
        with open(config_path) as f:
            self.config = json.load(f)
        index = os.path.join(self.folder, SAFETENSORS_INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        else:
            from safetensors import safe_open

            self.weight_map = {}
            for file in sorted(f for f in os.listdir(self.folder) if f.endswith(".safetensors")):
                with safe_open(os.path.join(self.folder, file), "pt") as handle:
                    self.weight_map.update(dict.fromkeys(handle.keys(), file))
        if not self.weight_map:
            raise FileNotFoundError(f"{folder} has no *.safetensors weights")
        self._handles: dict[str, object] = {}

    def check(self, args: Llama3Args, flavor: str) -> None:
        """Raise ValueError unless config.json and the tensor names fit `args`."""
        check_hf_config(self.config, args, flavor, f"{self.folder}/config.json")
        known = {from_hf_name(k) for k in self.weight_map} - {None}
        missing = [name for name in param_names(args) if name not in known]
        if missing:
            raise ValueError(f"{self.folder} lacks {[to_hf_name(n) for n in missing[:4]]}")
        ignored = [k for k in self.weight_map if from_hf_name(k) is None]
        if ignored:
            logger.info("HF checkpoint %s: ignoring %d tensors raytitan has no use for (%s)",
                        self.folder, len(ignored), ignored[:3])

    def get(self, name: str, args: Llama3Args) -> torch.Tensor:
        """raytitan parameter `name`, in raytitan's layout and the stored dtype."""
        hf_name = to_hf_name(name)
        if hf_name not in self.weight_map and name == "output.weight" and \
                args.tie_word_embeddings:
            hf_name = "model.embed_tokens.weight"
        file = self.weight_map[hf_name]
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(os.path.join(self.folder, file), "pt")
        return from_hf_tensor(name, self._handles[file].get_tensor(hf_name), args)

    def tokenizer_files(self) -> dict[str, bytes]:
        return read_tokenizer_files(self.folder)


def read_tokenizer_files(path: str) -> dict[str, bytes]:
    """The tokenizer files of a local folder (TOKENIZER_FILES), or of one tokenizer.json."""
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            return {"tokenizer.json": f.read()}
    out = {}
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), "rb") as f:
                out[name] = f.read()
    return out


def fill_from_hf(folder: str, model_parts: list[torch.nn.Module], args: Llama3Args) -> None:
    """Fill every parameter of this rank's model parts from a local HF folder: each tensor
    is read memory-mapped and this rank keeps its own shard (no communication, any mesh)."""
    from raytitan.models.llama3.model import canonical_name
    from raytitan.parallel.utils import fill_param

    hf = HFCheckpoint(folder)
    for part in model_parts:
        for name, param in part.named_parameters():
            full = hf.get(canonical_name(name), args)
            fill_param(param, full.to(device=param.device, dtype=param.dtype))


class HFInitialLoad:
    """initial_load_in_hf: a fresh run's model from a local HF folder.

    Args:
        args: the run's model args.
        flavor: the run's model flavor (config.json must match it).
    """

    def __init__(self, args: Llama3Args, flavor: str) -> None:
        self.args, self.flavor = args, flavor

    def check(self, folder: str) -> None:
        """Raise OSError or ValueError unless `folder` is an HF folder of this model."""
        HFCheckpoint(folder).check(self.args, self.flavor)

    def fill(self, folder: str, model_parts: list[torch.nn.Module]) -> None:
        """Fill this rank's model parts from `folder` (fill_from_hf)."""
        fill_from_hf(folder, model_parts, self.args)


def resolve_step_url(out: str) -> str:
    """A step directory as given, or <out>/step-0 for any other folder."""
    try:
        split_step_dir(out)
        return out.rstrip("/")
    except ValueError:
        return f"{out.rstrip('/')}/step-0"


def import_hf(hf_folder: str, out: str, *, flavor: str, options: dict | None = None,
              dtype: str | None = None) -> tuple[str, dict]:
    """Write a local HF folder as a committed model-only step (never over an existing one).
    Returns the step URL and its manifest."""
    options = options or {}
    hf = HFCheckpoint(hf_folder)
    args = flavor_args(flavor, int(hf.config.get("vocab_size", 0)))
    hf.check(args, flavor)
    step_url = resolve_step_url(out)
    parent, step = split_step_dir(step_url)
    storage = CheckpointStorage(parent, options)
    if storage.step_exists(step):
        raise FileExistsError(f"{step_url} exists; choose another output or delete it")
    model = {}
    for name in param_names(args):
        tensor = hf.get(name, args)
        model[name] = tensor.to(_dtype(dtype)) if dtype else tensor.contiguous()
    if args.tie_word_embeddings:  # what a tied model's state dict holds (and a load asks for)
        model["output.weight"] = model["tok_embeddings.weight"]
    stored = _dtype_name(model["tok_embeddings.weight"].dtype)
    with _single_process():
        dcp.save({"model": model}, no_dist=True,
                 storage_writer=StepWriter(step_url, storage_options=options, checksums=True))
    files = {f"tokenizer/{name}": data for name, data in hf.tokenizer_files().items()}
    manifest, _ = storage.commit_step(
        step, {"model_only": True, "dtype": stored, "keys": ["model"], "world_size": 1,
               "flavor": flavor, "source": os.path.abspath(hf.folder)}, files=files)
    return step_url, manifest


# -- single torch file (torchtune) --------------------------------------------------------


def step_to_torch(step_url: str, out: str, *, options: dict | None = None,
                  model_only: bool = True, dtype: str | None = None,
                  out_options: dict | None = None) -> dict:
    """Write a step as one `torch.save` file (local or remote).

    model_only: {raytitan name: tensor}, which are Meta's Llama names (torchtune's
    FullModelMetaCheckpointer reads them). Otherwise everything, nested by top-level key
    like `dcp_to_torch` writes it. `dtype` casts the model's tensors."""
    options = options or {}
    check_committed(step_url, options)
    if model_only:
        entries = model_entries(step_url, options)
        if not entries:
            raise CheckpointError(f"{step_url} holds no model tensors")
        state = read_model_tensors(step_url, options, entries, sorted(entries))
        model = state
    else:
        # What dcp_to_torch_save does, through our fsspec reader (local or remote).
        state = {}
        with _single_process():
            _load_state_dict(state, storage_reader=step_reader(step_url, options),
                             planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        model = state.get("model", {})
    if dtype:
        cast = _dtype(dtype)
        for name, tensor in model.items():
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                model[name] = tensor.to(cast)
    parent, _, name = out.rstrip("/").rpartition("/")
    folder = _Folder(parent or ("/" if out.startswith("/") else "."),
                     out_options if out_options is not None else options)
    if folder.exists(name):
        raise FileExistsError(f"{out} exists; choose another output or delete it")
    return folder.put(name, lambda path: torch.save(state, path))

