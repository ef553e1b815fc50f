"""Several layers that read one input, stacked row-wise for one solve (what the ``*_prune_group`` functions share)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stack_layers(
    weights: Sequence[torch.Tensor], sparsities: Sequence[float]
) -> tuple[list[torch.Tensor | None], list[int], list[slice]]:
    """``(results, todo, rows)``: ``results`` holds a copy of every layer with nothing to prune (sparsity <= 0) and
    ``None`` for the others; ``todo`` their indices; ``rows`` their row range in the stacked matrix.

    Example:
        >>> results, todo, rows = stack_layers([torch.ones(2, 3), torch.ones(1, 3), torch.ones(4, 3)], [0.5, 0.0, 0.5])
        >>> [r is None for r in results], todo, rows
        ([True, False, True], [0, 2], [slice(0, 2, None), slice(2, 6, None)])
    """
    if len(weights) != len(sparsities):
        raise ValueError(f"{len(weights)} weights but {len(sparsities)} sparsities")
    results = [w.detach().clone() if s <= 0 else None for w, s in zip(weights, sparsities, strict=True)]
    todo = [i for i, r in enumerate(results) if r is None]
    rows, start = [], 0
    for i in todo:
        rows.append(slice(start, start + weights[i].shape[0]))
        start += weights[i].shape[0]
    return results, todo, rows
