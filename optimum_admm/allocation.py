"""Non-uniform sparsity: how many weights each layer loses, with the model's total kept exact. Pure functions.

Two sources of per-layer sparsities, for every method:

- an explicit map, ``{pattern: sparsity}`` (``PruningConfig.sparsity_map``; patterns match layer names as targets
  do, first match wins);
- OWL, outlier-weighted layerwise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)", ICML 2024,
  https://arxiv.org/abs/2310.05175): each decoder block's outlier ratio ``D_b`` is the share of its Wanda scores
  ``|W_ij| ||X_j||`` above ``M`` times their mean; ratios are scaled to ``[0, 2 lambda]`` and each block's sparsity
  is ``s - (D_b - mean D)``: blocks with more outliers keep more weights.

:func:`allocate` then holds the mapped layers at their values and shifts the others by one common amount so that
the zeros over all targeted weights are exactly ``sparsity`` of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import InvalidArgumentError

__all__ = ["allocate", "outlier_ratio", "owl_sparsities"]


def outlier_ratio(weights: list[torch.Tensor], squared_norms: list[torch.Tensor], m: float) -> float:
    """The share of a block's Wanda scores ``|W_ij| ||X_j||`` above ``m`` times their mean (over all its layers).

    Example:
        >>> w = torch.tensor([[1.0, 1.0, 1.0, 10.0]])
        >>> outlier_ratio([w], [torch.ones(4)], m=2.0)
        0.25
    """
    scores = [
        w.detach().abs().float() * n.to(w.device).float().clamp_min(0).sqrt()
        for w, n in zip(weights, squared_norms, strict=True)
    ]
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Block sparsities from outlier ratios: ratios scaled to ``[0, 2 lam]``, sparsity ``target - (D_b - mean D)``.

    Example:
        >>> [round(s, 3) for s in owl_sparsities([0.01, 0.02, 0.03], 0.7, 0.08)]
        [0.78, 0.7, 0.62]
    """
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = float(d.max() - d.min())
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    return [float(target - (x - scaled.mean())) for x in scaled]


def allocate(
    sizes: dict[str, int],
    target: float,
    base: dict[str, float] | None = None,
    fixed: dict[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer sparsities whose size-weighted mean is ``target``: ``fixed`` layers at their value, the others at
    ``base`` (``target`` when absent) shifted by one common amount.

    Raises:
        InvalidArgumentError: when the free layers would need a sparsity outside ``[0, 1)``.

    Example:
        >>> allocate({"a": 100, "b": 300}, 0.5, fixed={"a": 0.2})
        {'a': 0.2, 'b': 0.6}
    """
    base, fixed = base or {}, fixed or {}
    total = sum(sizes.values())
    free = [n for n in sizes if n not in fixed]
    out = {n: float(fixed[n]) for n in sizes if n in fixed}
    if not free:
        return out
    pruned = sum(fixed[n] * sizes[n] for n in out)
    free_size = sum(sizes[n] for n in free)
    start = {n: base.get(n, target) for n in free}
    shift = (target * total - pruned - sum(start[n] * sizes[n] for n in free)) / free_size
    for name in free:
        value = start[name] + shift
        if not 0.0 <= value < 1.0:
            raise InvalidArgumentError(
                f"sparsity_map={fixed!r} leaves {name} at sparsity {value:.3f} to keep the total at "
                f"sparsity={target:g}; allowed: values that leave every other layer in [0, 1)"
            )
        out[name] = value
    return {n: out[n] for n in sizes}


def first_match(name: str, module, patterns: dict[str, float], matches: Callable) -> float | None:
    """The sparsity of the first pattern of ``patterns`` that matches the layer, ``None`` if none does."""
    return next((value for pattern, value in patterns.items() if matches(name, module, pattern)), None)
