"""Wanda: prune by ``|W_ij| * ||X_j||_2``, no weight update.

Paper: Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024,
https://arxiv.org/abs/2306.11695. The input statistic is the squared input-channel norms ``sum_t x_tj^2``
(shape ``(in,)``, what the driver collects for Wanda) or, equivalently, a Gram matrix ``X^T X`` (its diagonal).
"""

from __future__ import annotations

import torch

from ..masks import row_chunks, select_mask

__all__ = ["wanda_scores", "wanda_mask", "wanda_prune"]


def _input_norms(statistic: torch.Tensor, device: torch.device) -> torch.Tensor:
    squared = statistic.diagonal() if statistic.dim() == 2 else statistic
    return squared.to(device=device, dtype=torch.float32).clamp_min(0).sqrt()


def wanda_scores(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||``, in fp32, from squared norms ``(in,)`` or a Gram matrix ``(in, in)``."""
    scores = weight.detach().abs().float()  # a new tensor: scaled in place
    return scores.mul_(_input_norms(gram, weight.device))


def wanda_mask(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    per_output: bool = True,
) -> torch.Tensor:
    """The keep-mask of Wanda: ``False`` at the smallest ``|W_ij| * ||X_j||`` (per output row by default, or N:M).

    Example:
        >>> w = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
        >>> wanda_mask(w, torch.diag(torch.tensor([4.0, 1.0, 9.0, 0.25])), 0.5).tolist()
        [[True, False, True, False]]
    """
    weight = weight.detach()
    if nm is not None or not per_output:
        return select_mask(wanda_scores(weight, gram), sparsity, nm=nm, per_output=per_output)
    # Per-row selection: rows are independent, so score and select a chunk of rows at a time (bounded workspace).
    norms = _input_norms(gram, weight.device)
    keep = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    for rows in row_chunks(weight):
        keep[rows] = select_mask(weight[rows].abs().float().mul_(norms), sparsity, per_output=True)
    return keep


def wanda_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    per_output: bool = True,
) -> torch.Tensor:
    """Zero the weights with the smallest Wanda score (per output row by default, or N:M); see :func:`wanda_mask`.

    Example:
        >>> w = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
        >>> wanda_prune(w, torch.diag(torch.tensor([4.0, 1.0, 9.0, 0.25])), 0.5).tolist()
        [[1.0, 0.0, 1.0, 0.0]]
    """
    keep = wanda_mask(weight, gram, sparsity, nm=nm, per_output=per_output)
    return weight.detach().masked_fill(~keep, 0)
