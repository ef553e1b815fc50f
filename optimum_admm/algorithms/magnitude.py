"""Magnitude pruning: keep the largest ``|W|`` (per layer, per row, or N:M). No calibration data, no update."""

from __future__ import annotations

import torch

from ..masks import select_mask

__all__ = ["magnitude_mask", "magnitude_prune"]


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, per_output: bool = False
) -> torch.Tensor:
    """The keep-mask of magnitude pruning: ``False`` at the smallest ``|W|``.

    Example:
        >>> magnitude_mask(torch.tensor([[0.1, -3.0, 2.0, -0.5]]), 0.5).tolist()
        [[False, True, True, False]]
    """
    return select_mask(weight.detach().abs().float(), sparsity, nm=nm, per_output=per_output)


def magnitude_prune(
    weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, per_output: bool = False
) -> torch.Tensor:
    """Zero the smallest-magnitude weights.

    Example:
        >>> magnitude_prune(torch.tensor([[0.1, -3.0, 2.0, -0.5]]), 0.5).tolist()
        [[0.0, -3.0, 2.0, 0.0]]
    """
    keep = magnitude_mask(weight, sparsity, nm=nm, per_output=per_output)
    return weight.detach().masked_fill(~keep, 0.0)
