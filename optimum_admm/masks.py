"""Mask selection and sparsity schedules: pure tensor functions.

Every function takes a score matrix laid out like a weight, ``(out_features, in_features)``, and returns a boolean
*keep* mask of the same shape (``True`` = weight kept). Low scores are pruned. Ties are broken deterministically: among
equal scores the one with the lower (flattened) index is pruned first, so quantised weights with many exact ties still
give the same mask on every run and every device.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "cubic_sparsity",
    "scheduled_sparsity",
    "num_pruned",
    "unstructured_mask",
    "nm_mask",
    "gradual_nm_mask",
    "select_mask",
    "is_valid_nm",
    "row_chunks",
]


def cubic_sparsity(target: float, step: int, total_steps: int) -> float:
    """Cubic ramp of Boža (2024): ``s_t = s - s * (1 - (t + 1) / T) ** 3``.

    Example:
        >>> round(cubic_sparsity(0.5, 0, 15), 4)
        0.0935
        >>> cubic_sparsity(0.5, 14, 15)
        0.5
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} is invalid; allowed: an integer >= 1")
    progress = min(max((step + 1) / total_steps, 0.0), 1.0)
    return target - target * (1.0 - progress) ** 3


def scheduled_sparsity(target: float, step: int, total_steps: int, schedule: str) -> float:
    """Sparsity at mask step ``step``: the cubic ramp, or ``target`` throughout for ``"constant"``."""
    if schedule == "cubic":
        return cubic_sparsity(target, step, total_steps)
    if schedule == "constant":
        return target
    raise ValueError(f"schedule={schedule!r} is unknown; allowed: 'cubic', 'constant'")


def num_pruned(numel: int, sparsity: float) -> int:
    """``floor(numel * sparsity)``, robust to float round-off (``0.75 * 8`` is 6, never 5)."""
    return min(numel, int(math.floor(numel * sparsity + 1e-6)))


_CHUNK = 1 << 18  # elements per chunk of rows in row-wise work (1 MiB of fp32)


def row_chunks(matrix: torch.Tensor) -> list[slice]:
    """Slices of consecutive rows of about 2^18 elements each (at least one row), covering every row.

    Row-independent work (per-row selection, scoring, in-place masking, error sums) runs a chunk at a time so its
    workspace stays small next to the layer however wide it is.

    Example:
        >>> row_chunks(torch.empty(5, 2**17))
        [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    rows = max(1, _CHUNK // max(1, matrix.shape[-1]))
    return [slice(start, min(start + rows, matrix.shape[0])) for start in range(0, matrix.shape[0], rows)]


def _prune_smallest(scores: torch.Tensor, k: int, dim: int | None) -> torch.Tensor:
    """Keep-mask pruning the ``k`` smallest scores (over everything, or along ``dim``), ties by lower index."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if dim is None:
        flat = scores.reshape(-1)
        if k >= flat.numel():
            return torch.zeros_like(scores, dtype=torch.bool)
        threshold = flat.kthvalue(k).values  # 0-d: broadcasting a 0-d tensor is much cheaper than a (1,) one
        pruned = flat <= threshold
        if int(torch.count_nonzero(pruned)) > k:  # ties at the threshold: prune the lower indices first
            ties = flat == threshold
            still_needed = k - int(torch.count_nonzero(flat < threshold))
            pruned = (flat < threshold) | (ties & (ties.cumsum(0, dtype=torch.int32) <= still_needed))
        return (~pruned).reshape(scores.shape)
    if k >= scores.shape[dim]:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.dim() == 2 and dim in (1, -1) and scores.numel() > _CHUNK:
        # Per-row selection is row-independent: chunks of rows bound the selection's workspace (kthvalue copies).
        return torch.cat([_prune_smallest(scores[rows], k, dim) for rows in row_chunks(scores)])
    threshold = scores.kthvalue(k, dim=dim, keepdim=True).values
    pruned = scores <= threshold
    if bool((torch.count_nonzero(pruned, dim=dim) > k).any()):
        below = scores < threshold
        ties = scores == threshold
        still_needed = k - torch.count_nonzero(below, dim=dim).unsqueeze(dim)
        pruned = below | (ties & (ties.cumsum(dim, dtype=torch.int32) <= still_needed))
    return ~pruned


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_output: bool = False) -> torch.Tensor:
    """Prune the ``floor(numel * sparsity)`` smallest scores of the layer, or ``floor(in * sparsity)`` per row.

    Example:
        >>> scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 8.0, 7.0, 6.0]])
        >>> unstructured_mask(scores, 0.5).int().tolist()
        [[1, 0, 0, 0], [0, 1, 1, 1]]
        >>> unstructured_mask(scores, 0.5, per_output=True).int().tolist()
        [[1, 0, 1, 0], [0, 1, 1, 0]]
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out_features, in_features); got shape {tuple(scores.shape)}")
    if per_output:
        return _prune_smallest(scores, num_pruned(scores.shape[1], sparsity), dim=1)
    return _prune_smallest(scores, num_pruned(scores.numel(), sparsity), dim=None)


def _groups(scores: torch.Tensor, m: int) -> torch.Tensor:
    out_features, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"in_features={in_features} is not divisible by M={m}; an N:M mask needs groups of M inputs")
    return scores.reshape(out_features, in_features // m, m)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest scores in every group of ``m`` consecutive inputs of each row.

    Example:
        >>> nm_mask(torch.tensor([[1.0, 4.0, 3.0, 2.0, 5.0, 5.0, 0.0, 5.0]]), 2, 4).int().tolist()
        [[0, 1, 1, 0, 0, 1, 0, 1]]
    """
    if scores.numel() > _CHUNK and scores.shape[0] > 1:  # rows are independent: bound argsort's int64 indices
        return torch.cat([nm_mask(scores[rows], n, m) for rows in row_chunks(scores)])
    groups = _groups(scores, m)
    order = torch.argsort(groups, dim=-1, stable=True)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : m - n], False)
    return keep.reshape(scores.shape)


def gradual_nm_mask(scores: torch.Tensor, n: int, m: int, sparsity: float) -> torch.Tensor:
    """An N:M mask reached gradually: the top-``n`` of every group are always kept; of the others, the
    ``floor(numel * sparsity)`` smallest over the layer are pruned. At ``sparsity = 1 - n/m`` this is :func:`nm_mask`.

    Example:
        >>> s = torch.tensor([[4.0, 3.0, 2.0, 1.0], [8.0, 7.0, 6.0, 5.0]])
        >>> gradual_nm_mask(s, 2, 4, 0.25).int().tolist()
        [[1, 1, 0, 0], [1, 1, 1, 1]]
    """
    protected = nm_mask(scores, n, m)
    unprotected = protected.numel() - int(torch.count_nonzero(protected))
    k = min(num_pruned(scores.numel(), sparsity), unprotected)
    if k == unprotected:  # the full N:M target (the usual case): the per-group selection is the mask
        return protected
    candidates = scores.masked_fill(protected, float("inf"))
    return _prune_smallest(candidates, k, dim=None)


def select_mask(
    scores: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    per_output: bool = False,
) -> torch.Tensor:
    """Dispatch to :func:`unstructured_mask` or :func:`gradual_nm_mask` (``sparsity`` ramps toward ``1 - n/m``)."""
    if nm is None:
        return unstructured_mask(scores, sparsity, per_output=per_output)
    return gradual_nm_mask(scores, nm[0], nm[1], sparsity)


def is_valid_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive inputs of every row has at most ``n`` non-zeros."""
    groups = _groups(weight, m)
    return bool(((groups != 0).sum(dim=-1) <= n).all())
