"""Llama-3 in plain PyTorch: RMSNorm, RoPE with Llama-3.1 frequency scaling, GQA, SwiGLU.

No torch.distributed here. Build it on the meta device, parallelize it, materialize it with
`to_empty`, then call `init_weights` (or load a checkpoint into it).

Shape legend: B batch, L sequence, D model dim, H query heads, K kv heads, E head dim,
V vocabulary, F feed-forward hidden dim.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Container
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 RoPE frequency scaling (long-context extension)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class Llama3Args:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    multiple_of: int = 1024
    ffn_dim_multiplier: float | None = 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    max_seq_len: int = 131072
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Meta's rule: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        """Parameter count, computed from the shapes (no model needed)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = 2 * self.dim * self.dim + 2 * self.dim * kv_dim
        ffn = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attention + ffn + 2 * self.dim
        embedding = self.vocab_size * self.dim
        output = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        total = self.n_layers * per_layer + self.dim + embedding + output
        return total - embedding if exclude_embedding else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per non-embedding weight plus causal-free attention
        scores (12 * layers * dim * seq_len), the convention of the PaLM paper and TorchTitan."""
        matmul_params = self.num_params(exclude_embedding=True)
        if self.tie_word_embeddings:  # the shared matrix still does the output projection
            matmul_params += self.vocab_size * self.dim
        return 6 * matmul_params + 12 * self.n_layers * self.dim * seq_len


def precompute_rope(args: Llama3Args, device: torch.device | str | None = None) -> torch.Tensor:
    """cos/sin table [max_seq_len, E/2, 2] for interleaved (Meta-layout) rotary embeddings."""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
    if args.rope_scaling is not None:
        freqs = _scale_rope_freqs(freqs, args.rope_scaling)
    t = torch.arange(args.max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def _scale_rope_freqs(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama-3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * freqs / s.factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / s.factor, freqs)
    middle = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(middle, blended, scaled)


def apply_rope(x_BLHE: torch.Tensor, rope_LE2: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) by position-dependent angles."""
    B, L, H, E = x_BLHE.shape
    x = x_BLHE.float().reshape(B, L, H, E // 2, 2)
    cos = rope_LE2[:L, None, :, 0]
    sin = rope_LE2[:L, None, :, 1]
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.reshape(B, L, H, E).type_as(x_BLHE)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: Llama3Args) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        kv_dim = args.n_kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, kv_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x_BLD: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        # NOTE: head counts come from the (possibly tensor-parallel) local weights via -1.
        q_BLHE = self.wq(x_BLD).view(B, L, -1, self.head_dim)
        k_BLKE = self.wk(x_BLD).view(B, L, -1, self.head_dim)
        v_BLKE = self.wv(x_BLD).view(B, L, -1, self.head_dim)
        q_BLHE, k_BLKE = apply_rope(q_BLHE, rope), apply_rope(k_BLKE, rope)
        out_BHLE = F.scaled_dot_product_attention(
            q_BLHE.transpose(1, 2),
            k_BLKE.transpose(1, 2),
            v_BLKE.transpose(1, 2),
            is_causal=True,
            enable_gqa=True,
        )
        return self.wo(out_BHLE.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: Llama3Args) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x_BLD: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = x_BLD + self.attention(self.attention_norm(x_BLD), rope)
        return h + self.feed_forward(self.ffn_norm(h))


# Prefixes that activation checkpointing and torch.compile wrappers add to parameter names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """A parameter's name without wrapper prefixes: the same under every parallelism."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


# Fills the (possibly sharded) parameter `param` from `full`, a tensor of the full shape.
FillFn = Callable[[torch.Tensor, torch.Tensor], None]


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    param.copy_(full)


class Llama3(nn.Module):
    """The decoder. A pipeline stage is this module with the parts it does not own set to
    None (`tok_embeddings`, `norm`, `output`) and layers removed; layer names keep their
    global index, so parameter names are the same under every parallelism."""

    def __init__(self, args: Llama3Args) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", precompute_rope(args), persistent=False)

    def forward(self, tokens_or_h: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (first stage) or hidden states [B, L, D] -> logits [B, L, V]
        (last stage) or hidden states [B, L, D]."""
        h = self.tok_embeddings(tokens_or_h) if self.tok_embeddings is not None else tokens_or_h
        for layer in self.layers.values():
            h = layer(h, self.rope)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(
        self,
        seed: int,
        *,
        fill: FillFn = _copy_full,
        buffer_device: torch.device | str | None = None,
        params: Container[str] | None = None,
    ) -> None:
        """Initialize every parameter from a generator seeded by (seed, parameter name).

        Each value depends only on the seed and the parameter's name, never on how the
        model is split, so every parallelism starts from identical weights. `fill` copies a
        full-shape tensor into a (possibly sharded) parameter. `params`: the (canonical)
        names to initialize, default all; the others are left as they are, for a checkpoint
        load to fill (the buffers are always computed).
        """
        self.rope = precompute_rope(self.args, device=buffer_device)
        for wrapped_name, param in self.named_parameters():
            name = canonical_name(wrapped_name)
            if params is not None and name not in params:
                continue
            gen_device = param.device if param.device.type != "meta" else "cpu"
            gen = torch.Generator(device=gen_device)
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.empty(param.shape, dtype=torch.float32, device=gen_device)
            self._init_param(name, full, gen)
            fill(param, full.to(param.dtype))

    def _init_param(self, name: str, full: torch.Tensor, gen: torch.Generator) -> None:
        # TorchTitan's scheme: depth-scaled std for the residual-branch output projections.
        if name.endswith("norm.weight"):
            full.fill_(1.0)
            return
        if name == "tok_embeddings.weight" and not self.args.tie_word_embeddings:
            nn.init.normal_(full, generator=gen)
            return
        if name in ("output.weight", "tok_embeddings.weight"):
            std = self.args.dim**-0.5
            nn.init.trunc_normal_(full, std=std, a=-3 * std, b=3 * std, generator=gen)
            return
        layer_id = int(name.split(".")[1])
        std = 0.02
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight",
                          "feed_forward.w3.weight")):
            std = 0.02 / (2 * (layer_id + 1)) ** 0.5
        nn.init.trunc_normal_(full, std=std, a=-2.0, b=2.0, generator=gen)
