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


_SAMPLE = 1 << 14  # sample size that brackets a layer-wide k-th smallest score


def _kth_smallest(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int | None]:
    """The ``k``-th smallest value of a 1-D tensor (0-d tensor), equal to ``flat.kthvalue(k).values``, 2-3x faster
    on large tensors: a fixed random sample brackets the value, one pass counts what lies below the bracket, and
    only the ~3% inside it are selected from. When the bracket misses (skewed data, NaN) the full selection runs.
    Also returns how many values are ``<=`` it when that came for free (``None`` otherwise)."""
    n = flat.numel()
    if n <= 8 * _SAMPLE:
        return flat.kthvalue(k).values, None
    generator = torch.Generator().manual_seed(n)  # fixed: the same sample every call (the result is exact anyway)
    sample = flat[torch.randint(n, (_SAMPLE,), generator=generator).to(flat.device)]
    position = (k - 0.5) / n * _SAMPLE
    width = 4.0 * math.sqrt(max(position * (1.0 - position / _SAMPLE), 1.0)) + 8.0  # ~4 standard deviations
    low_index, high_index = int(position - width), int(math.ceil(position + width))
    if low_index <= 0 and high_index >= _SAMPLE:
        return flat.kthvalue(k).values, None
    below, inside = 0, None
    if low_index > 0:  # the sample's two order statistics by selection (a sort of the sample costs ~4x more)
        low = flat < sample.kthvalue(low_index + 1).values
        below = int(torch.count_nonzero(low))
        inside = low.logical_not_()
    if high_index < _SAMPLE:
        not_high = flat <= sample.kthvalue(high_index + 1).values
        inside = not_high if inside is None else inside.logical_and_(not_high)
    candidates = flat[inside]
    if below < k <= below + candidates.numel():
        threshold = candidates.kthvalue(k - below).values
        return threshold, below + int(torch.count_nonzero(candidates <= threshold))
    return flat.kthvalue(k).values, None


def _prune_smallest(scores: torch.Tensor, k: int, dim: int | None) -> torch.Tensor:
    """Keep-mask pruning the ``k`` smallest scores (over everything, or along ``dim``), ties by lower index."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if dim is None:
        flat = scores.reshape(-1)
        if k >= flat.numel():
            return torch.zeros_like(scores, dtype=torch.bool)
        threshold, at_most = _kth_smallest(flat, k)  # 0-d: broadcasting a 0-d tensor is much cheaper than (1,)
        keep = flat > threshold
        if at_most is None:
            at_most = flat.numel() - int(torch.count_nonzero(keep))
        if at_most > k:  # ties at the threshold: prune the lower indices first
            ties = flat == threshold
            still_needed = k - int(torch.count_nonzero(flat < threshold))
            keep = ~((flat < threshold) | (ties & (ties.cumsum(0, dtype=torch.int32) <= still_needed)))
        return keep.reshape(scores.shape)
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


_RANK_MAX_M = 8  # up to this group size the N:M selection compares ranks (m^2 passes over 1/m of the data)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest scores in every group of ``m`` consecutive inputs of each row.

    Example:
        >>> nm_mask(torch.tensor([[1.0, 4.0, 3.0, 2.0, 5.0, 5.0, 0.0, 5.0]]), 2, 4).int().tolist()
        [[0, 1, 1, 0, 0, 1, 0, 1]]
    """
    if scores.numel() > 4 * _CHUNK and scores.shape[0] > 1:  # rows are independent: bound the workspace
        rows = max(1, 4 * _CHUNK // scores.shape[1])
        return torch.cat([nm_mask(scores[i : i + rows], n, m) for i in range(0, scores.shape[0], rows)])
    groups = _groups(scores, m)
    if m > _RANK_MAX_M:
        order = torch.argsort(groups, dim=-1, stable=True)
        keep = torch.ones_like(groups, dtype=torch.bool)
        keep.scatter_(-1, order[..., : m - n], False)
        return keep.reshape(scores.shape)
    # An element's place in the stable ascending order of its group is the number of elements before it: smaller,
    # or equal with a lower index. The m - n first are pruned. Each comparison is one vectorised pass over a strided
    # group position, written straight into the mask's own layout (an argsort over groups of 4 is ~5x slower, and
    # copying the positions into contiguous planes and back cost a third more than this).
    keep = torch.empty(groups.shape, dtype=torch.bool, device=scores.device)
    place = torch.empty(groups.shape[:2], dtype=torch.uint8, device=scores.device)
    before = torch.empty(groups.shape[:2], dtype=torch.bool, device=scores.device)
    for i in range(m):
        place.zero_()
        for j in range(m):
            if j != i:
                (torch.le if j < i else torch.lt)(groups[..., j], groups[..., i], out=before)
                place.add_(before.view(torch.uint8))  # a view, not a conversion
        torch.ge(place, m - n, out=keep[..., i])
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
    unprotected = scores.numel() // m * (m - n)  # every group keeps exactly n
    k = min(num_pruned(scores.numel(), sparsity), unprotected)
    if k == unprotected:  # the full N:M target (the usual case): the per-group selection is the mask
        return protected
    return _prune_smallest(_lift(scores, protected), k, dim=None)


def _lift(scores: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """``torch.where(protected, inf, scores)`` without its cost on CPU (a random bool condition makes ``where`` and
    ``masked_fill`` ~15x slower than an add): three adds of ``protected * finfo.max`` take any finite score to +inf
    and leave the others as they are (``x + 0``). Non-finite scores take the ``where``."""
    if not bool(torch.isfinite(scores.sum())):  # NaN or inf somewhere (or a sum past the float range)
        return torch.where(protected, float("inf"), scores)
    step = protected.view(torch.uint8)  # a view: uint8 converts to float at an add's speed, bool does not
    big = torch.finfo(scores.dtype).max
    return torch.add(scores, step, alpha=big).add_(step, alpha=big).add_(step, alpha=big)


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
