"""Wanda: prune by ``|W_ij| * ||X_j||_2``, no weight update.

Paper: Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024,
https://arxiv.org/abs/2306.11695. The input norms come from the diagonal of the Gram matrix ``X^T X``.
"""

from __future__ import annotations

import torch

from ..masks import _CHUNK, select_mask

__all__ = ["wanda_scores", "wanda_prune"]


def _input_norms(gram: torch.Tensor, device: torch.device) -> torch.Tensor:
    return gram.diagonal().to(device=device, dtype=torch.float32).clamp_min(0).sqrt()


def wanda_scores(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * sqrt(G_jj)``, in fp32."""
    scores = weight.detach().abs().float()  # a new tensor: scaled in place
    return scores.mul_(_input_norms(gram, weight.device))


def wanda_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    per_output: bool = True,
) -> torch.Tensor:
    """Zero the weights with the smallest Wanda score (per output row by default, or N:M).

    Example:
        >>> w = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
        >>> wanda_prune(w, torch.diag(torch.tensor([4.0, 1.0, 9.0, 0.25])), 0.5).tolist()
        [[1.0, 0.0, 1.0, 0.0]]
    """
    weight = weight.detach()
    if nm is not None or not per_output:
        return weight.masked_fill(~select_mask(wanda_scores(weight, gram), sparsity, nm=nm, per_output=per_output), 0)
    # Per-row selection: rows are independent, so score and select a chunk of rows at a time (bounded workspace).
    norms = _input_norms(gram, weight.device)
    pruned = torch.empty_like(weight)
    rows = max(1, _CHUNK // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        part = weight[start : start + rows]
        scores = part.abs().float().mul_(norms)
        keep = select_mask(scores, sparsity, per_output=True)
        pruned[start : start + rows] = part.masked_fill(~keep, 0)
    return pruned
