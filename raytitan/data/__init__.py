"""Data: prepare token shards (prepare.py, ray_io.py), stream them per DP rank (stream.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from raytitan.config.job_config import Data
from raytitan.data.prepare import MANIFEST, Manifest


def builtin_dataset_dir(cfg: Data) -> str:
    return os.path.join(os.path.expanduser(cfg.cache_dir), f"python-docs-bpe{cfg.tokenizer_vocab_size}")


def resolve_dataset(cfg: Data, prepare: Callable[..., Manifest]) -> str:
    """The prepared dataset folder of this run. For the builtin corpus it is prepared with
    `prepare(input, output, vocab_size=...)` on first use, into a temporary folder that is
    renamed into place when complete (so concurrent or killed runs never see half of it)."""
    if cfg.path:
        return cfg.path
    from raytitan.data.corpus import write_python_docs_jsonl

    out = builtin_dataset_dir(cfg)
    if os.path.exists(os.path.join(out, MANIFEST)):
        return out
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    corpus = write_python_docs_jsonl(os.path.join(tmp, "corpus", "python-docs.jsonl"))
    # Small shards (64 Ki tokens), so even this small corpus exercises the shard order.
    prepare(corpus, tmp, vocab_size=cfg.tokenizer_vocab_size, shard_tokens=1 << 16)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
