"""Llama-3 flavors with the published shapes (Meta's model cards / params.json)."""

from raytitan.models.llama3.model import Llama3, Llama3Args, RopeScaling

_LLAMA_3_2_ROPE = RopeScaling(factor=32.0)  # 1B and 3B

LLAMA3_FLAVORS: dict[str, Llama3Args] = {
    # Small enough to train in seconds on a CPU; vocab_size comes from the tokenizer.
    "debug": Llama3Args(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, multiple_of=64,
        ffn_dim_multiplier=None, rope_theta=500000.0,
    ),
    "1B": Llama3Args(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
        ffn_dim_multiplier=1.5, rope_scaling=_LLAMA_3_2_ROPE, tie_word_embeddings=True,
    ),
    "3B": Llama3Args(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256,
        ffn_dim_multiplier=1.0, rope_scaling=_LLAMA_3_2_ROPE, tie_word_embeddings=True,
    ),
    "8B": Llama3Args(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
        ffn_dim_multiplier=1.3,
    ),
    "70B": Llama3Args(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.3,
    ),
    "405B": Llama3Args(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.2,
    ),
}

__all__ = ["LLAMA3_FLAVORS", "Llama3", "Llama3Args", "RopeScaling"]
