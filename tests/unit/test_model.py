"""Model: published parameter counts, init independent of how the model is split."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raytitan.models.llama3 import LLAMA3_FLAVORS, Llama3
from raytitan.models.llama3.model import apply_rope, precompute_rope
from raytitan.models.llama3.pipeline import split_into_stages

# Meta's published counts (Llama 3.2 1B/3B tie the embeddings; 3.1 8B/70B/405B do not).
PUBLISHED = {"1B": 1_235_814_400, "3B": 3_212_749_824, "8B": 8_030_261_248,
             "70B": 70_553_706_496, "405B": 405_853_388_800}


@pytest.mark.parametrize("flavor", list(PUBLISHED))
def test_parameter_counts_match_published(flavor):
    args = LLAMA3_FLAVORS[flavor]
    assert args.num_params() == PUBLISHED[flavor]
    if flavor in ("1B", "8B"):  # build the real module on meta for two of them
        with torch.device("meta"):
            model = Llama3(dataclasses.replace(args, max_seq_len=16))
        assert sum(p.numel() for p in model.parameters()) == PUBLISHED[flavor]


def test_flops_per_token_8b():
    # 6 * 7.50e9 non-embedding params + 12 * 32 * 4096 * 8192 attention
    args = LLAMA3_FLAVORS["8B"]
    assert args.flops_per_token(8192) == pytest.approx(6 * 7_504_924_672 + 12 * 32 * 4096 * 8192)


def debug_model(seed=0):
    args = dataclasses.replace(LLAMA3_FLAVORS["debug"], vocab_size=300, max_seq_len=32)
    with torch.device("meta"):
        model = Llama3(args)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


def test_init_is_deterministic_and_seeded():
    a, b, c = debug_model(0), debug_model(0), debug_model(1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_pipeline_stages_init_like_the_whole_model():
    whole = dict(debug_model(0).named_parameters())
    with torch.device("meta"):
        model = Llama3(debug_model(0).args)
    for rank in range(2):
        for _, stage in split_into_stages(model, rank, 2, "Interleaved1F1B"):
            stage.to_empty(device="cpu")
            stage.init_weights(0)
            for name, p in stage.named_parameters():
                assert torch.equal(p, whole[name]), name


def test_forward_is_causal():
    model = debug_model()
    x = torch.randint(0, 300, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 300
    with torch.no_grad():
        assert torch.equal(model(x)[0, :10], model(y)[0, :10])
        assert not torch.equal(model(x)[0, 10:], model(y)[0, 10:])


def test_rope_rotates_pairs_and_keeps_norm():
    args = dataclasses.replace(LLAMA3_FLAVORS["debug"], max_seq_len=8)
    rope = precompute_rope(args)
    x = torch.randn(1, 8, 2, args.head_dim)
    out = apply_rope(x, rope)
    assert torch.allclose(out[:, 0], x[:, 0])  # position 0 is not rotated
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
