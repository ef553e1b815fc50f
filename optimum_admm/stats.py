"""Input statistics of a linear layer, shared between layers that read the same input.

The Gram matrix ``G = X^T X`` (fp32, summed over every calibration token) is all ADMM and SparseGPT need; its
diagonal holds the squared input-channel norms that Wanda uses.
"""

from __future__ import annotations

import torch

from .masks import row_chunks

__all__ = ["GramAccumulator", "relative_reconstruction_error", "masked_reconstruction_error"]


class GramAccumulator:
    """Accumulates ``X^T X`` over calibration batches in fp32.

    Example:
        >>> acc = GramAccumulator(3)
        >>> acc.add(torch.ones(2, 5, 3))
        >>> acc.gram[0, 0].item(), acc.num_tokens
        (10.0, 10)
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add the tokens of ``inputs`` (``(..., in_features)``)."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(device=self.gram.device, dtype=torch.float32)
        self.gram.addmm_(x.T, x)
        self.num_tokens += x.shape[0]


def relative_reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X (W - W0)^T||^2 / ||X W0^T||^2``, computed from the Gram matrix in fp32.

    Example:
        >>> w0 = torch.tensor([[1.0, 2.0]])
        >>> round(relative_reconstruction_error(w0, torch.tensor([[1.0, 0.0]]), torch.eye(2)), 6)
        0.8
    """
    numerator = denominator = 0.0
    for rows in row_chunks(dense):
        w0 = dense[rows].to(device=gram.device, dtype=torch.float32)
        delta = pruned[rows].to(device=gram.device, dtype=torch.float32) - w0
        numerator += _quadratic_form(delta, gram)
        denominator += _quadratic_form(w0, gram)
    return _ratio(numerator, denominator)


def masked_reconstruction_error(dense: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> float:
    """:func:`relative_reconstruction_error` of ``dense.masked_fill(~keep, 0)``, without building that copy.

    Example:
        >>> w0 = torch.tensor([[1.0, 2.0]])
        >>> round(masked_reconstruction_error(w0, torch.tensor([[True, False]]), torch.eye(2)), 6)
        0.8
    """
    numerator = denominator = 0.0
    for rows in row_chunks(dense):
        w0 = dense[rows].to(device=gram.device, dtype=torch.float32)
        removed = w0.masked_fill(keep[rows].to(gram.device), 0)  # pruned - w0 = -removed
        numerator += _quadratic_form(removed, gram)
        denominator += _quadratic_form(w0, gram)
    return _ratio(numerator, denominator)


def _quadratic_form(rows: torch.Tensor, gram: torch.Tensor) -> float:
    """``sum_i r_i G r_i^T`` over the rows ``r_i``."""
    return float(((rows @ gram) * rows).sum())


def _ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0:
        return 0.0 if numerator <= 0 else float("inf")
    return float(numerator / denominator)
