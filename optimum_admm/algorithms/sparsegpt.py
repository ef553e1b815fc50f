"""SparseGPT: one-shot pruning by an approximate Optimal Brain Surgeon column sweep.

Paper: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023,
https://arxiv.org/abs/2301.00774.

With ``H = X^T X`` (fp32; dead channels get ``H_jj = 1`` and zero weights), damped by ``dampening * mean(diag H)``,
and ``U`` the upper Cholesky factor of ``H^-1``, columns are swept in blocks of ``block_size``:

    at a block's start choose its mask by w^2 / U_jj^2 (N:M: every M columns, on the current updated weights)
    for each column j:  err = (w_j - q_j) / U_jj;   W[:, j:] -= err * U[j, j:]
    after the block:    W[:, end:] -= Err_block @ U[block, end:]      (the lazy batch update)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..masks import nm_mask, unstructured_mask
from ._precision import full_fp32
from ._stacking import stack_layers
from .admm import _cholesky_inverse

__all__ = ["sparsegpt_prune", "sparsegpt_prune_group"]


def sparsegpt_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> torch.Tensor:
    """Prune one layer with SparseGPT.

    Args:
        weight: ``(out_features, in_features)`` dense weights.
        gram: ``X^T X``, ``(in_features, in_features)`` (any positive scale: the result does not depend on it).
        sparsity: fraction of zeros; each block of columns gets ``floor(out * block * sparsity)`` of them.
        nm: ``(N, M)`` for an N:M mask.
        block_size: columns per lazy batch update.
        dampening: damping as a fraction of the mean Hessian diagonal.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(128, 16, generator=g)
        >>> pruned = sparsegpt_prune(torch.randn(4, 16, generator=g), x.T @ x, 0.5)
        >>> int((pruned == 0).sum())
        32
    """
    return sparsegpt_prune_group([weight], gram, [sparsity], nm=nm, block_size=block_size, dampening=dampening)[0]


def sparsegpt_prune_group(
    weights: Sequence[torch.Tensor],
    gram: torch.Tensor,
    sparsities: Sequence[float],
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> list[torch.Tensor]:
    """Prune several layers that read the same input in one sweep: one factorisation of the shared Hessian, their rows
    stacked through the column loop (one Python loop instead of one per layer), each layer's unstructured mask chosen
    over its own rows. Equal to one :func:`sparsegpt_prune` per layer.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(128, 16, generator=g)
        >>> a, b = sparsegpt_prune_group([torch.randn(4, 16, generator=g), torch.randn(2, 16, generator=g)], x.T @ x,
        ...                              [0.5, 0.25])
        >>> int((a == 0).sum()), int((b == 0).sum())
        (32, 8)
    """
    results, todo, segments = stack_layers(weights, sparsities)
    if not todo:
        return results  # type: ignore[return-value]
    with torch.no_grad(), full_fp32():
        device = weights[todo[0]].device
        w = torch.cat([weights[i].detach().to(device=device, dtype=torch.float32) for i in todo])
        h = gram.to(device=device, dtype=torch.float32).clone()
        columns = w.shape[1]
        dead = h.diagonal() <= 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        h.diagonal().add_(dampening * float(h.diagonal().mean()))
        h_inv = _cholesky_inverse(h)
        u = torch.linalg.cholesky(h_inv, upper=True)
        del h, h_inv

        for start in range(0, columns, block_size):
            end = min(start + block_size, columns)
            w_block = w[:, start:end].clone()
            u_block = u[start:end, start:end]
            u_diag = u_block.diagonal()
            errors = torch.zeros_like(w_block)
            prune = torch.zeros_like(w_block, dtype=torch.bool)
            if nm is None:  # each layer's own share of its rows in this block
                for i, rows in zip(todo, segments, strict=True):
                    prune[rows] = ~unstructured_mask(w_block[rows].square() / u_diag.square(), float(sparsities[i]))
            for i in range(end - start):
                # N:M: filled one group of M columns at a time, as the sweep reaches it
                if nm is not None and i % nm[1] == 0:
                    group = slice(i, i + nm[1])
                    prune[:, group] = ~nm_mask(w_block[:, group].square() / u_diag[group].square(), nm[0], nm[1])
                column = w_block[:, i]
                pruned_column = column.masked_fill(prune[:, i], 0.0)
                error = (column - pruned_column) / u_block[i, i]
                w_block[:, i:] -= error[:, None] * u_block[i, i:][None, :]
                w_block[:, i] = pruned_column
                errors[:, i] = error
            w[:, start:end] = w_block
            w[:, end:] -= errors @ u[start:end, end:]
        w[:, dead] = 0.0
        if not torch.isfinite(w).all():
            raise FloatingPointError("SparseGPT produced non-finite weights; check the calibration activations.")
        for i, rows in zip(todo, segments, strict=True):
            results[i] = w[rows].to(dtype=weights[i].dtype)
    return results  # type: ignore[return-value]
