"""Tiny random models of any model type transformers knows, built from its default config shrunk in place.

One generic shrinker, no table per family: every size-like attribute a config commonly has (widths, depths, head
counts, expert counts, vocabulary) is set to a small value when the config has it, then every per-layer list is cut
to the new depth. A model type whose config needs more than this to build is reported by the sweep as "not built".
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

#: Small values for the size attributes configs commonly have (only those a config already has are set).
SIZES: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 128,
    "d_model": 128,
    "n_embd": 128,
    "dim": 128,
    "intermediate_size": 192,
    "ffn_hidden_size": 192,
    "ffn_dim": 192,
    "n_inner": 192,
    "moe_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "n_kv_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 32,
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "top_k": 2,
    "moe_k": 2,
    "hidden_size_per_layer_input": 16,
    "n_shared_experts": 1,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "sliding_window": 16,
    "kv_lora_rank": 32,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 32,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
}


#: Sizes some default configs leave unset (``None``) for a checkpoint to fill.
UNSET_SIZES = {"num_experts_per_tok", "head_dim", "moe_intermediate_size", "n_routed_experts", "num_experts"}


def _overrides(defaults: dict[str, Any], sub_configs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that shrink one config: size attributes it has, per-layer lists cut to the new depth,
    and (as dicts) its sub-configs' own."""
    out: dict[str, Any] = {}
    for key, value in SIZES.items():
        current = defaults.get(key, False)
        if (isinstance(current, int) and not isinstance(current, bool)) or (current is None and key in UNSET_SIZES):
            out[key] = value
    vocab = out.get("vocab_size", defaults.get("vocab_size"))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = defaults.get(key)
        if isinstance(vocab, int) and isinstance(value, int) and value >= vocab:  # special ids inside the vocabulary
            out[key] = min(value, 3) if value < 4 else 1
    if "qk_rope_head_dim" in out:  # multi-head latent attention: the rotary part is the head_dim
        out["head_dim"] = out["qk_rope_head_dim"]
    depth = next((out[k] for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers") if k in out), None)
    for key, value in defaults.items():
        if (
            depth
            and isinstance(value, list)
            and len(value) > depth
            and all(not isinstance(v, (dict, list)) for v in value)
        ):
            out[key] = value[:depth]
    for key, sub in sub_configs.items():
        sub_defaults = defaults.get(key)
        if isinstance(sub_defaults, dict):
            nested = sub.sub_configs if hasattr(sub, "sub_configs") else {}
            out[key] = {**sub_defaults, **_overrides(sub_defaults, nested)}
    return out


def tiny_config(model_type: str, **overrides: Any):
    """The default config of ``model_type`` rebuilt with small sizes (its ``__init__`` recomputes what derives from
    them), and its sub-configs likewise."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    kwargs = _overrides(defaults, getattr(config_class, "sub_configs", {}) or {})
    kwargs.update(overrides)
    return config_class(**kwargs)


def build(model_type: str, seed: int = 0, task: str = "causal-lm", **overrides: Any):
    """A model of ``model_type`` from :func:`tiny_config` (a causal LM, or an image-text-to-text model with
    ``task="image-text-to-text"``), fp32, eval mode, seeded."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if task == "image-text-to-text" else AutoModelForCausalLM
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(tiny_config(model_type, **overrides))
    return model.float().eval()
