"""Byte-level BPE tokenizer (HF `tokenizers`): train a small one, load one, find EOS."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with Llama-3's BOS/EOS names on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eos_id(tok: Tokenizer) -> int:
    """The id of the end-of-text token; raises if the tokenizer has none."""
    for name in (EOS, "</s>", "<|endoftext|>", "<eos>"):
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    raise ValueError(f"tokenizer has no end-of-text token (looked for {EOS!r}, '</s>', ...)")


def tokenizer_hash(tok_json: str) -> str:
    """sha256 of the tokenizer's JSON: the manifest records it so mismatches are caught."""
    return hashlib.sha256(tok_json.encode()).hexdigest()
