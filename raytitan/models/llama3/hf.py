"""raytitan Llama-3 <-> Hugging Face `LlamaForCausalLM`: parameter names, the q/k row layout,
and config.json. Pure functions of names, tensors and Llama3Args; reading and writing
safetensors folders is in `raytitan/interop/hf.py`.

raytitan (like Meta's checkpoints) rotates consecutive pairs of q/k features (x[2i],
x[2i+1]); HF rotates the two halves of each head (x[i], x[i + E/2]). The two agree once the
rows of wq and wk are permuted within each head, which is all `to_hf_tensor` changes.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from raytitan.models.llama3 import LLAMA3_FLAVORS
from raytitan.models.llama3.model import Llama3, Llama3Args, RopeScaling

# Per-layer names: raytitan suffix -> HF suffix (prefixes `layers.<i>.` / `model.layers.<i>.`).
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES_BACK = {hf: ours for ours, hf in _LAYER_NAMES.items()}
_TOP_NAMES_BACK = {hf: ours for ours, hf in _TOP_NAMES.items()}


def to_hf_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, layer, suffix = name.split(".", 2)
    if suffix not in _LAYER_NAMES:
        raise KeyError(f"{name!r} is not a raytitan Llama-3 parameter")
    return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"


def from_hf_name(hf_name: str) -> str | None:
    """The raytitan name of an HF parameter, or None for one raytitan has no use for
    (e.g. `rotary_emb.inv_freq`, which old checkpoints stored)."""
    if hf_name in _TOP_NAMES_BACK:
        return _TOP_NAMES_BACK[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES_BACK:
        return f"layers.{parts[2]}.{_LAYER_NAMES_BACK[parts[3]]}"
    return None


def param_shapes(args: Llama3Args) -> dict[str, tuple[int, ...]]:
    """Every parameter's full shape, in model order, from the model built on the meta
    device (a tied output shares the embedding, so it is not listed)."""
    with torch.device("meta"):
        model = Llama3(args)
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def param_names(args: Llama3Args) -> list[str]:
    """raytitan's parameter names in model order."""
    return list(param_shapes(args))


def _rope_heads(name: str, args: Llama3Args) -> int | None:
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf_tensor(name: str, tensor: torch.Tensor, args: Llama3Args) -> torch.Tensor:
    """The HF value of raytitan parameter `name` (q/k rows: pairs -> halves per head)."""
    heads = _rope_heads(name, args)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_tensor(name: str, tensor: torch.Tensor, args: Llama3Args) -> torch.Tensor:
    """The raytitan value of `name` from its HF tensor (q/k rows: halves -> pairs)."""
    heads = _rope_heads(name, args)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# -- config.json --------------------------------------------------------------------------


def hf_config(args: Llama3Args, *, dtype: str, bos_token_id: int | None,
              eos_token_id: int | None) -> dict:
    """config.json of a `LlamaForCausalLM` with these args. RoPE is written the way Meta's
    Llama-3.x checkpoints on the Hub write it (`rope_theta` + `rope_scaling`), which both
    transformers 4.x and 5.x read."""
    scaling = None
    if args.rope_scaling is not None:
        scaling = {**dataclasses.asdict(args.rope_scaling), "rope_type": "llama3"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": scaling,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def _hf_rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling or None) from a 4.x (`rope_theta`, `rope_scaling`) or a
    5.x (`rope_parameters`) config."""
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return float(theta), scaling


def _structure(args: Llama3Args) -> dict[str, object]:
    """What an HF config must agree with, as (HF field -> value) of these args."""
    scaling = args.rope_scaling
    return {
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "intermediate_size": args.ffn_hidden_dim,
        "head_dim": args.head_dim,
        "rope_theta": args.rope_theta,
        "rope_scaling": None if scaling is None else dataclasses.asdict(scaling),
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_word_embeddings,
    }


def _config_structure(config: dict) -> dict[str, object]:
    theta, scaling = _hf_rope(config)
    if scaling is not None:
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            scaling = {"rope_type": scaling.get("rope_type", scaling.get("type"))}
        else:
            scaling = {f.name: type(getattr(RopeScaling(), f.name))(scaling[f.name])
                       for f in dataclasses.fields(RopeScaling) if f.name in scaling}
    heads = config.get("num_attention_heads")
    return {
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads", heads),
        "intermediate_size": config.get("intermediate_size"),
        "head_dim": config.get("head_dim") or (
            config["hidden_size"] // heads if heads and config.get("hidden_size") else None),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rms_norm_eps": config.get("rms_norm_eps"),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def check_hf_config(config: dict, args: Llama3Args, flavor: str, source: str) -> None:
    """Raise ValueError if the HF `config` (from `source`) does not describe the model
    `args` of `flavor`: every mismatching field with both values, and the flavors that fit."""
    if config.get("model_type", "llama") != "llama" or config.get("hidden_act", "silu") != "silu" \
            or config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(
            f"{source} is not a Llama model raytitan can load (model_type "
            f"{config.get('model_type')!r}, hidden_act {config.get('hidden_act')!r}, "
            f"attention_bias {config.get('attention_bias')}, mlp_bias {config.get('mlp_bias')})")
    theirs = _config_structure(config)
    ours = _structure(args)
    diffs = [f"{key} {theirs[key]!r} != {ours[key]!r}" for key in ours
             if not _same(theirs[key], ours[key])]
    if config.get("vocab_size") != args.vocab_size:
        diffs.append(f"vocab_size {config.get('vocab_size')!r} != {args.vocab_size} "
                     "(set model.vocab_size, or use the model's tokenizer)")
    if diffs:
        fits = [name for name, flavor_args in LLAMA3_FLAVORS.items()
                if all(_same(theirs[k], v) for k, v in _structure(flavor_args).items())]
        raise ValueError(
            f"{source} does not match model.flavor = {flavor!r} (config.json vs flavor): "
            f"{'; '.join(diffs)}. Flavors with this structure: {fits or 'none'}; "
            f"choose one of {list(LLAMA3_FLAVORS)}")


def flavor_args(flavor: str, vocab_size: int) -> Llama3Args:
    """The flavor's args with this vocabulary size (the one thing a flavor leaves open)."""
    if flavor not in LLAMA3_FLAVORS:
        raise ValueError(f"flavor {flavor!r} is not valid; choose one of {list(LLAMA3_FLAVORS)}")
    return dataclasses.replace(LLAMA3_FLAVORS[flavor], vocab_size=vocab_size)
