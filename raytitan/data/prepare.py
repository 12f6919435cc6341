"""`raytitan prepare`: text -> token shards (parquet, one row per document) + manifest.

The pieces here are plain Python: listing inputs, reading documents, tokenizing a batch,
writing shards and the manifest. `ray_io.py` runs the same tokenize function as a Ray Data
pipeline; `prepare_local` runs it in this process (torchrun path, tests).

Output layout:
    OUT/shard-00000.parquet ...   column `tokens: list<int32>`, EOS appended per document
    OUT/tokenizer.json
    OUT/manifest.json             written last: a folder without it is incomplete
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from raytitan.data.tokenizer import eos_id, tokenizer_hash, train_bpe

logger = logging.getLogger(__name__)

TEXT_FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
                ".parquet": "parquet"}
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
# Characters of text the builtin BPE trainer sees at most (enough for a small vocabulary).
_BPE_TRAIN_CHARS = 200_000_000


@dataclass
class ShardInfo:
    path: str
    """File name relative to the dataset folder."""
    num_docs: int
    num_tokens: int


@dataclass
class Manifest:
    shards: list[ShardInfo]
    vocab_size: int
    eos_id: int
    tokenizer_sha256: str
    version: int = 1
    source: str = field(default="", compare=False)
    """Where the text came from (informational)."""
    root: str = field(default="", compare=False)
    """Folder the manifest was read from (not stored)."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    def shard_url(self, i: int) -> str:
        return posixpath.join(self.root, self.shards[i].path)

    @classmethod
    def load(cls, folder: str) -> Manifest:
        url = posixpath.join(folder, MANIFEST)
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise FileNotFoundError(
                f"{url} does not exist: {folder!r} is not a prepared dataset "
                "(run `raytitan prepare --input ... --output ...`)"
            )
        with fs.open(path, "r") as f:
            raw = json.load(f)
        shards = [ShardInfo(**s) for s in raw.pop("shards")]
        return cls(shards=shards, root=folder, **raw)

    def dump(self, folder: str) -> None:
        raw = asdict(self)
        raw.pop("root")
        with fsspec.open(posixpath.join(folder, MANIFEST), "w") as f:
            json.dump(raw, f, indent=1)


def list_inputs(input_path: str) -> tuple[list[str], str]:
    """Input files (sorted) and their format: a file, a folder, or a glob; local or s3://."""
    fs, path = fsspec.core.url_to_fs(input_path)
    if fs.isdir(path):
        files = [p for p in fs.find(path) if _suffix(p) in TEXT_FORMATS]
    elif fs.exists(path):
        files = [path]
    else:
        files = fs.glob(path)
    if not files:
        raise FileNotFoundError(
            f"no input files at {input_path!r} (looked for {sorted(TEXT_FORMATS)})"
        )
    formats = {TEXT_FORMATS.get(_suffix(p)) for p in files}
    if None in formats or len(formats) != 1:
        raise ValueError(
            f"inputs under {input_path!r} must all be one of {sorted(TEXT_FORMATS)}; "
            f"found suffixes {sorted({_suffix(p) for p in files})}"
        )
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("file", "local"):
        files = [f"{protocol}://{p}" for p in files]
    return sorted(files), formats.pop()


def _suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def iter_documents(files: list[str], fmt: str) -> Iterator[str]:
    """Documents of `files` in order: a whole text file, a jsonl line's or a parquet row's
    `text` field."""
    for url in files:
        if fmt == "text":
            with fsspec.open(url, "r", encoding="utf-8") as f:
                yield f.read()
        elif fmt == "jsonl":
            with fsspec.open(url, "r", encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)["text"]
        else:
            fs, path = fsspec.core.url_to_fs(url)
            yield from pq.read_table(path, columns=["text"], filesystem=fs)["text"].to_pylist()


def tokenize_texts(tok: Tokenizer, texts: list[str], eos: int) -> list[np.ndarray]:
    """Token ids (int32) of each text with EOS appended."""
    out = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = np.empty(len(enc.ids) + 1, dtype=np.int32)
        ids[:-1] = enc.ids
        ids[-1] = eos
        out.append(ids)
    return out


class ShardWriter:
    """Writes token lists to `shard-NNNNN.parquet` files of about `shard_tokens` tokens."""

    def __init__(self, output: str, shard_tokens: int) -> None:
        self.output = output
        self.shard_tokens = shard_tokens
        fs, path = fsspec.core.url_to_fs(output)
        fs.makedirs(path, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, docs: Iterable[np.ndarray]) -> None:
        for doc in docs:
            self._pending.append(doc)
            self._pending_tokens += len(doc)
            if self._pending_tokens >= self.shard_tokens:
                self._flush()

    def close(self) -> list[ShardInfo]:
        if self._pending:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):05d}.parquet"
        offsets = np.zeros(len(self._pending) + 1, dtype=np.int32)
        np.cumsum([len(d) for d in self._pending], out=offsets[1:])
        values = pa.array(np.concatenate(self._pending), type=pa.int32())
        table = pa.table({"tokens": pa.ListArray.from_arrays(pa.array(offsets), values)})
        fs, path = fsspec.core.url_to_fs(posixpath.join(self.output, name))
        pq.write_table(table, path, filesystem=fs)
        self.shards.append(ShardInfo(name, len(self._pending), int(offsets[-1])))
        logger.info("wrote %s: %d documents, %d tokens", name, len(self._pending), offsets[-1])
        self._pending, self._pending_tokens = [], 0


def load_or_train_tokenizer(
    tokenizer_path: str | None, texts: Callable[[], Iterable[str]], vocab_size: int
) -> Tokenizer:
    """Load `tokenizer_path` (a tokenizer.json or a folder holding one), or train a BPE."""
    if tokenizer_path:
        url = tokenizer_path
        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            url = posixpath.join(url, TOKENIZER)
        with fsspec.open(url, "r") as f:
            return Tokenizer.from_str(f.read())

    def capped() -> Iterator[str]:
        seen = 0
        for text in texts():
            yield text
            seen += len(text)
            if seen >= _BPE_TRAIN_CHARS:
                return

    logger.info("no tokenizer given: training a %d-token byte-level BPE on the input", vocab_size)
    return train_bpe(capped(), vocab_size)


def finish(output: str, tok: Tokenizer, shards: list[ShardInfo], source: str) -> Manifest:
    """Write tokenizer.json, then the manifest (last, so its presence means complete)."""
    if not shards or sum(s.num_tokens for s in shards) == 0:
        raise ValueError(f"no tokens were produced from {source!r}: are the inputs empty?")
    tok_json = tok.to_str()
    with fsspec.open(posixpath.join(output, TOKENIZER), "w") as f:
        f.write(tok_json)
    manifest = Manifest(
        shards=shards,
        vocab_size=tok.get_vocab_size(),
        eos_id=eos_id(tok),
        tokenizer_sha256=tokenizer_hash(tok_json),
        source=source,
        root=output,
    )
    manifest.dump(output)
    logger.info("prepared %s: %d shards, %d tokens", output, len(shards), manifest.num_tokens)
    return manifest


def prepare_local(
    input_path: str,
    output: str,
    *,
    tokenizer_path: str | None = None,
    vocab_size: int = 2048,
    shard_tokens: int = 32 * 2**20,
    batch_docs: int = 256,
) -> Manifest:
    """Prepare a dataset in this process (no Ray). Same output as the Ray pipeline."""
    files, fmt = list_inputs(input_path)
    tok = load_or_train_tokenizer(tokenizer_path, lambda: iter_documents(files, fmt), vocab_size)
    eos = eos_id(tok)
    writer = ShardWriter(output, shard_tokens)
    batch: list[str] = []
    for text in iter_documents(files, fmt):
        batch.append(text)
        if len(batch) == batch_docs:
            writer.add(tokenize_texts(tok, batch, eos))
            batch = []
    if batch:
        writer.add(tokenize_texts(tok, batch, eos))
    return finish(output, tok, writer.close(), input_path)
