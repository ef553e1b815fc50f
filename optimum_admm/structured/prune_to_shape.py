"""Finalise: fold the surviving gate values into the weights, slice, drop layers, return a standard smaller model.

Each surviving gate value is folded exactly once per path (Sheared-LLaMA, https://arxiv.org/abs/2310.06694, §3 of our
spec), so the sliced model computes what the masked model computes with the same final gates:

* head gate -> the ``v_proj`` rows of its KV group (``'kv_group'`` mode) or the ``o_proj`` columns of its query head
  (``'query'`` mode, where V is shared by heads with different gates);
* FFN gate -> the ``up_proj`` rows (never ``gate_proj``, which sits behind the nonlinearity);
* layer gate x hidden gate -> the ``o_proj`` and ``down_proj`` output rows (and biases);
* hidden gate -> the embedding columns and every RMSNorm weight; ``lm_head`` is only sliced. With tied embeddings
  the surviving hidden gates must be 1 (``binarize``) or the head is untied first.

The result is a fresh instance of the source model's class built from a config carrying the target values
(``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
``head_dim``), so ``save_pretrained`` writes what plain ``AutoModelForCausalLM.from_pretrained`` loads.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, vocab_size=10))
    >>> small = prune_to_shape(model, {"layer": torch.tensor([1.0, 0.0])})
    >>> small.config.num_hidden_layers
    1
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .layout import BLOCK_NORMS, ModelLayout

logger = logging.getLogger(__name__)

__all__ = ["prune_to_shape"]


def _gate_values(gates: Any) -> tuple[dict[str, torch.Tensor], bool]:
    """``(final values, untie)`` from a ShearingModule or a mapping of final values."""
    if hasattr(gates, "final_gates") and hasattr(gates, "config"):
        return gates.final_gates(), gates.config.tied_embeddings == "untie"
    if isinstance(gates, Mapping):
        return {k: v.detach().float().cpu() for k, v in gates.items()}, False
    raise TypeError(f"gates must be a ShearingModule or a mapping of final gate values, got {type(gates).__name__}")


def _kept(values: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(values != 0).flatten()


def _channels(units: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices of whole units (heads) of ``width`` channels."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def _uniform_count(name: str, counts: list[int]) -> int:
    if len(set(counts)) != 1:
        raise ValueError(f"{name} gates keep different counts per layer ({counts}); a standard config needs one count")
    return counts[0]


def _linear(sd: dict, prefix: str, rows=None, cols=None, row_scale=None, col_scale=None) -> None:
    """Scale (rows then columns) and slice ``prefix.weight`` / ``prefix.bias`` in ``sd`` in place (fp32 maths)."""
    weight = sd[f"{prefix}.weight"]
    w = weight.float()
    if row_scale is not None:
        w = w * row_scale[:, None]
    if col_scale is not None:
        w = w * col_scale[None, :]
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    sd[f"{prefix}.weight"] = w.to(weight.dtype).contiguous()
    bias = sd.get(f"{prefix}.bias")
    if bias is not None:
        b = bias.float() * (row_scale if row_scale is not None else 1.0)
        sd[f"{prefix}.bias"] = (b[rows] if rows is not None else b).to(bias.dtype).contiguous()


def _vector(sd: dict, key: str, keep: torch.Tensor, scale: torch.Tensor) -> None:
    value = sd[key]
    sd[key] = (value.float() * scale)[keep].to(value.dtype).contiguous()


def _resolve(values: dict[str, torch.Tensor], config: Any) -> dict[str, Any]:
    """Fill absent gates with ones, pick the head mode, and check the kept counts."""
    layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    g = {
        "layer": values.get("layer", torch.ones(layers)),
        "hidden": values.get("hidden", torch.ones(hidden)),
        "head": values.get("head", torch.ones(layers, kv)),
        "intermediate": values.get("intermediate", torch.ones(layers, config.intermediate_size)),
    }
    expected = {"layer": (layers,), "hidden": (hidden,), "intermediate": (layers, config.intermediate_size)}
    for name, shape in expected.items():
        if tuple(g[name].shape) != shape:
            raise ValueError(f"{name} gate has shape {tuple(g[name].shape)}, expected {shape}")
    if tuple(g["head"].shape) not in ((layers, kv), (layers, heads)):
        raise ValueError(
            f"head gate has shape {tuple(g['head'].shape)}, expected ({layers}, {kv}) or ({layers}, {heads})"
        )
    g = {k: v.detach().float().cpu() for k, v in g.items()}
    mode = "kv_group" if g["head"].shape[1] == kv else "query"
    layers_kept = _kept(g["layer"])
    if len(layers_kept) == 0 or len(_kept(g["hidden"])) == 0:
        raise ValueError("the gates prune every layer or every hidden channel")
    units = _uniform_count("head", [len(_kept(g["head"][i])) for i in layers_kept])
    if mode == "query":
        per_group = g["head"][layers_kept].reshape(len(layers_kept), kv, heads // kv)
        _uniform_count("query-head-per-group", [int(c) for c in (per_group != 0).sum(-1).flatten()])
    inter = _uniform_count("intermediate", [len(_kept(g["intermediate"][i])) for i in layers_kept])
    if units == 0 or inter == 0:
        raise ValueError("the gates prune every head or every FFN channel of a kept layer")
    return {"g": g, "mode": mode, "layers": layers_kept, "units": units, "inter": inter, "kv": kv, "heads": heads}


def _fold_block(sd: dict, prefix: str, layer: int, r: dict, keep_h: torch.Tensor, head_dim: int) -> None:
    """Fold and slice the tensors of one kept block (state-dict keys under ``prefix``)."""
    g, kv, heads = r["g"], r["kv"], r["heads"]
    zh = g["hidden"]
    out_scale = g["layer"][layer] * zh
    head = g["head"][layer]
    attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
    if r["mode"] == "kv_group":
        groups = _kept(head)
        q_heads = (groups[:, None] * (heads // kv) + torch.arange(heads // kv)).flatten()
        v_scale = head.repeat_interleave(head_dim)
        o_col_scale = None
    else:
        groups, q_heads = torch.arange(kv), _kept(head)
        v_scale, o_col_scale = None, head.repeat_interleave(head_dim)
    q_rows, kv_rows = _channels(q_heads, head_dim), _channels(groups, head_dim)
    _linear(sd, f"{attn}.q_proj", rows=q_rows, cols=keep_h)
    _linear(sd, f"{attn}.k_proj", rows=kv_rows, cols=keep_h)
    _linear(sd, f"{attn}.v_proj", rows=kv_rows, cols=keep_h, row_scale=v_scale)
    _linear(sd, f"{attn}.o_proj", rows=keep_h, cols=q_rows, row_scale=out_scale, col_scale=o_col_scale)
    inter = g["intermediate"][layer]
    keep_m = _kept(inter)
    _linear(sd, f"{mlp}.gate_proj", rows=keep_m, cols=keep_h)
    _linear(sd, f"{mlp}.up_proj", rows=keep_m, cols=keep_h, row_scale=inter)
    _linear(sd, f"{mlp}.down_proj", rows=keep_h, cols=keep_m, row_scale=out_scale)
    for norm in BLOCK_NORMS:
        _vector(sd, f"{prefix}.{norm}.weight", keep_h, zh)


def _target_config(config: Any, r: dict, hidden: int, head_dim: int, untie: bool) -> Any:
    new = copy.deepcopy(config)
    group = r["heads"] // r["kv"]
    heads = r["units"] * group if r["mode"] == "kv_group" else r["units"]
    new.num_hidden_layers = len(r["layers"])
    new.hidden_size = hidden
    new.num_attention_heads = heads
    new.num_key_value_heads = r["units"] if r["mode"] == "kv_group" else r["kv"]
    new.intermediate_size = r["inter"]
    new.head_dim = head_dim
    if isinstance(getattr(config, "layer_types", None), list):
        new.layer_types = [config.layer_types[i] for i in r["layers"].tolist()]
    if untie:
        new.tie_word_embeddings = False
    return new


@torch.no_grad()
def prune_to_shape(model: nn.Module, gates: Any, *, untie_embeddings: bool | None = None) -> nn.Module:
    """Build the physically smaller model that the gates select.

    Args:
        model: The source LLaMA-like model (unchanged; hooks, if attached, are ignored).
        gates: A :class:`~optimum_admm.structured.gating.ShearingModule` (its final top-k gates are used) or a
            mapping ``structure -> final gate values`` where 0 means pruned (``layer [L]``, ``head [L, KV]`` or
            ``[L, H]``, ``intermediate [L, m]``, ``hidden [d]``; absent structures are kept whole).
        untie_embeddings: With tied embeddings, untie instead of requiring surviving hidden gates of 1. ``None``
            follows the ShearingModule's ``tied_embeddings`` policy (False for a mapping).

    Returns:
        A new model of the same class, in eval mode, on the source's device and dtype.

    Raises:
        ValueError: when the gates keep different counts in different layers, or (tied embeddings, not untied)
            surviving hidden gates are not 1.

    Example:
        >>> trainer.train()  # a ShearingTrainer  # doctest: +SKIP
        >>> trainer.shearing.detach()  # doctest: +SKIP
        >>> small = prune_to_shape(model, trainer.shearing)  # doctest: +SKIP
        >>> small.save_pretrained("sheared")  # doctest: +SKIP
    """
    values, policy_untie = _gate_values(gates)
    untie = policy_untie if untie_embeddings is None else untie_embeddings
    config = model.config
    layout = ModelLayout.of(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    r = _resolve(values, config)
    zh = r["g"]["hidden"]
    keep_h = _kept(zh)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    untie = untie and tied
    if tied and not untie and not torch.all(zh[keep_h] == 1):
        raise ValueError("tied embeddings: surviving hidden gates must be 1 (binarize them) or use untie_embeddings")
    names = {module: name for name, module in model.named_modules()}
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    embed_key, head_key = f"{names[layout.embed]}.weight", f"{names[layout.lm_head]}.weight"
    head_weight = sd[head_key]
    for layer in r["layers"].tolist():
        _fold_block(sd, f"{layout.blocks_name}.{layer}", layer, r, keep_h, head_dim)
    _vector(sd, f"{names[layout.final_norm]}.weight", keep_h, zh)
    embed = sd[embed_key]
    sd[embed_key] = (embed.float() * zh)[:, keep_h].to(embed.dtype).contiguous()
    sd[head_key] = head_weight[:, keep_h].contiguous()
    renumber = {old: new for new, old in enumerate(r["layers"].tolist())}
    prefix = f"{layout.blocks_name}."
    new_sd = {}
    for key, value in sd.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) not in renumber:
                continue
            key = f"{prefix}{renumber[int(index)]}.{rest}"
        new_sd[key] = value
    new_config = _target_config(config, r, len(keep_h), head_dim, untie)
    parameter = next(model.parameters())
    small = type(model)(new_config).to(device=parameter.device, dtype=parameter.dtype)
    small.load_state_dict(new_sd, strict=True)
    if getattr(model, "generation_config", None) is not None:
        small.generation_config = copy.deepcopy(model.generation_config)
    logger.info(
        "Pruned to layers=%d hidden=%d heads=%d kv_heads=%d intermediate=%d (%d -> %d parameters)",
        new_config.num_hidden_layers,
        new_config.hidden_size,
        new_config.num_attention_heads,
        new_config.num_key_value_heads,
        new_config.intermediate_size,
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in small.parameters()),
    )
    return small.eval()
