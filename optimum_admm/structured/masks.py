"""Deterministic structured masks that hit the target counts exactly.

``topk_keep`` keeps the ``k`` highest scores of every row (optionally of every group of consecutive entries inside a
row), breaking ties towards the lower index so that equal scores (4-bit weights have many) give the same mask on
every run. :func:`final_gates` turns per-structure scores and soft values into the final gate values of a
:class:`~optimum_admm.structured.configuration.ShearingPlan`: zero where pruned, the soft value where kept.

Example:
    >>> import torch
    >>> topk_keep(torch.tensor([[0.1, 0.9, 0.5, 0.5]]), k=2)
    tensor([[False,  True,  True, False]])
    >>> topk_keep(torch.tensor([[0.1, 0.9, 0.5, 0.2]]), k=1, groups=2)
    tensor([[False,  True,  True, False]])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .configuration import ShearingPlan

__all__ = ["final_gates", "topk_keep"]


def topk_keep(scores: torch.Tensor, k: int, groups: int = 1) -> torch.Tensor:
    """Boolean mask keeping the ``k`` largest scores of each of ``groups`` equal slices of the last dimension.

    Args:
        scores: ``[..., n]`` scores; higher is kept.
        k: Entries kept per group (``0 <= k <= n / groups``).
        groups: Number of equal consecutive groups the last dimension is split into.

    Raises:
        ValueError: when ``n`` is not divisible by ``groups`` or ``k`` is out of range.

    Example:
        >>> topk_keep(torch.tensor([[0.3, 0.9, 0.1, 0.5]]), 1, groups=2).tolist()
        [[False, True, False, True]]
    """
    n = scores.shape[-1]
    if n % groups:
        raise ValueError(f"cannot split {n} entries into {groups} equal groups")
    size = n // groups
    if not 0 <= k <= size:
        raise ValueError(f"k={k} is out of range for groups of {size} entries")
    grouped = scores.detach().float().reshape(*scores.shape[:-1], groups, size)
    # A stable descending sort keeps the lower index first among ties.
    order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, order[..., :k], True)
    return keep.reshape(scores.shape)


def final_gates(
    scores: Mapping[str, torch.Tensor],
    plan: ShearingPlan,
    values: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Final gate values: exactly the plan's target count kept per row, ``values`` (or 1) on survivors, 0 elsewhere.

    Heads and FFN channels are chosen per layer (query heads per KV group in ``'query'`` mode); layers and hidden
    channels globally. With ``plan.binarize_hidden`` the surviving hidden gates are 1.

    Args:
        scores: Per-structure scores (the gate logits, or a baseline's importance).
        plan: The resolved target.
        values: Per-structure soft values of the survivors; ``None`` keeps survivors at 1.

    Example:
        >>> from transformers import LlamaConfig
        >>> from optimum_admm.structured import ShearingConfig
        >>> plan = ShearingConfig(num_hidden_layers=1).plan(LlamaConfig(hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, vocab_size=10))
        >>> final_gates({"layer": torch.tensor([0.3, 0.7])}, plan)["layer"]
        tensor([0., 1.])
    """
    out = {}
    for name, score in scores.items():
        groups = plan.query_groups if name == "head" else 1
        keep = topk_keep(score, plan.target_units(name) // groups, groups=groups)
        value = torch.ones_like(score, dtype=torch.float32) if values is None else values[name].float()
        if name == "hidden" and plan.binarize_hidden:
            value = torch.ones_like(value)
        out[name] = torch.where(keep, value.to(keep.device), torch.zeros((), device=keep.device))
    return out
