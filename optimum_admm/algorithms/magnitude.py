"""Magnitude pruning: keep the largest ``|W|`` (per layer, per row, or N:M). No calibration data, no update."""

from __future__ import annotations

import torch

from ..masks import select_mask

__all__ = ["magnitude_prune"]


def magnitude_prune(
    weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, per_output: bool = False
) -> torch.Tensor:
    """Zero the smallest-magnitude weights.

    Example:
        >>> magnitude_prune(torch.tensor([[0.1, -3.0, 2.0, -0.5]]), 0.5).tolist()
        [[0.0, -3.0, 2.0, 0.0]]
    """
    keep = select_mask(weight.detach().abs().float(), sparsity, nm=nm, per_output=per_output)
    return weight.detach().masked_fill(~keep, 0.0)
