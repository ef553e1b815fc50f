"""Dynamic batch loading maths: the domain-weight update rules and the scaling-law reference losses.

Sheared LLaMA (Xia et al., 2023, https://arxiv.org/abs/2310.06694), Algorithm 1. Domains ``i = 1..k`` with weights
``w`` (a probability vector), validation losses ``l`` and reference losses ``l_ref``:

* ``paper`` rule (the paper): ``d = max(l - l_ref, 0)``; ``w <- w * exp(eta * d)``; ``w <- w / sum(w)``
  (``eta = 1`` in the paper).
* ``reference_code`` rule (princeton-nlp/LLM-Shearing): ``d = l - l_ref`` (not clipped);
  ``w <- softmax(log w + eta * d)``; ``w <- (1 - c) * w + c / k`` with ``c = 1e-4``. Because ``d`` is not clipped,
  domains that beat their reference lose weight every update (the reference run ends with GitHub at 0.0002).
* ``constant``: ``w`` unchanged (a fixed mixture, for comparisons).

Reference losses come from the user, from the source model's own losses, or from a scaling law
``L(N) = a * N^-b + c`` fitted per domain over three or more model sizes (:func:`fit_scaling_law`).

All functions are pure: they take sequences or tensors and return new float64 tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

UPDATE_RULES: tuple[str, ...] = ("paper", "reference_code", "constant")

ArrayLike = Sequence[float] | torch.Tensor


def _vector(name: str, values: ArrayLike) -> torch.Tensor:
    vector = torch.as_tensor(values, dtype=torch.float64).flatten().clone()
    if vector.numel() == 0:
        raise ValueError(f"{name} must hold at least one value, got {values!r}")
    if not torch.isfinite(vector).all():
        raise ValueError(f"{name} must be finite, got {vector.tolist()}")
    return vector


def normalize_weights(weights: ArrayLike) -> torch.Tensor:
    """Return ``weights / sum(weights)`` as float64, after checking they are finite, >= 0 and not all zero.

    Args:
        weights: Non-negative domain weights (any scale).

    Returns:
        A probability vector (float64).

    Raises:
        ValueError: Negative, non-finite or all-zero weights.

    Example:
        >>> normalize_weights([1, 1, 2]).tolist()
        [0.25, 0.25, 0.5]
    """
    vector = _vector("weights", weights)
    if (vector < 0).any() or vector.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {vector.tolist()}")
    return vector / vector.sum()


def _check_update_inputs(
    weights: ArrayLike, losses: ArrayLike, reference_losses: ArrayLike, step_size: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = normalize_weights(weights)
    loss = _vector("losses", losses)
    reference = _vector("reference_losses", reference_losses)
    if not (loss.numel() == reference.numel() == w.numel()):
        raise ValueError(
            f"weights, losses and reference_losses must have the same length, got {w.numel()}, {loss.numel()} "
            f"and {reference.numel()}"
        )
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0:
        raise ValueError(f"step_size must be a positive number, got {step_size!r}")
    return w, loss, reference


def paper_update(
    weights: ArrayLike, losses: ArrayLike, reference_losses: ArrayLike, step_size: float = 1.0
) -> torch.Tensor:
    """The paper's rule: clipped excess loss, multiplicative update, normalise.

    ``d = max(l - l_ref, 0)``, ``w' = w * exp(step_size * d) / sum(w * exp(step_size * d))``.

    Args:
        weights: Current domain weights (normalised first).
        losses: Current per-domain validation losses (mean token NLL).
        reference_losses: Per-domain reference losses, same order.
        step_size: Multiplier of the excess loss (the paper uses 1).

    Returns:
        The new weights (float64, sum 1).

    Example:
        >>> [round(x, 6) for x in paper_update([0.5, 0.5], [2.0, 1.0], [1.0, 1.5]).tolist()]  # e^1 : e^0
        [0.731059, 0.268941]
    """
    w, loss, reference = _check_update_inputs(weights, losses, reference_losses, step_size)
    excess = (loss - reference).clamp_min(0.0)
    # In log space, so that a large excess cannot overflow exp().
    return torch.softmax(torch.log(w) + step_size * excess, dim=0)


def reference_code_update(
    weights: ArrayLike,
    losses: ArrayLike,
    reference_losses: ArrayLike,
    step_size: float = 1.0,
    smoothing: float = 1e-4,
) -> torch.Tensor:
    """The reference code's rule: unclipped excess loss, softmax with a step size, smoothing toward uniform.

    ``w' = (1 - c) * softmax(log w + step_size * (l - l_ref)) + c / k``.

    Args:
        weights: Current domain weights (normalised first).
        losses: Current per-domain validation losses.
        reference_losses: Per-domain reference losses, same order.
        step_size: The step size ``eta``.
        smoothing: The smoothing ``c`` in ``[0, 1)``.

    Returns:
        The new weights (float64, sum 1).

    Example:
        >>> [round(x, 6) for x in reference_code_update([0.5, 0.5], [2.0, 1.0], [1.0, 2.0], smoothing=0.0).tolist()]
        [0.880797, 0.119203]
    """
    w, loss, reference = _check_update_inputs(weights, losses, reference_losses, step_size)
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be a number in [0, 1), got {smoothing!r}")
    new = torch.softmax(torch.log(w) + step_size * (loss - reference), dim=0)
    return (1.0 - smoothing) * new + smoothing / w.numel()


def update_domain_weights(
    weights: ArrayLike,
    losses: ArrayLike,
    reference_losses: ArrayLike,
    rule: str = "paper",
    step_size: float = 1.0,
    smoothing: float = 1e-4,
) -> torch.Tensor:
    """Apply one of :data:`UPDATE_RULES` (``paper``, ``reference_code`` or ``constant``).

    Args:
        weights: Current domain weights.
        losses: Current per-domain validation losses.
        reference_losses: Per-domain reference losses.
        rule: ``"paper"`` (:func:`paper_update`), ``"reference_code"`` (:func:`reference_code_update`) or
            ``"constant"`` (the normalised weights, unchanged).
        step_size: Step size of either rule.
        smoothing: Smoothing of the ``reference_code`` rule.

    Returns:
        The new weights (float64, sum 1).

    Example:
        >>> update_domain_weights([1, 3], [2.0, 2.0], [1.0, 1.0], rule="constant").tolist()
        [0.25, 0.75]
    """
    if rule == "paper":
        return paper_update(weights, losses, reference_losses, step_size)
    if rule == "reference_code":
        return reference_code_update(weights, losses, reference_losses, step_size, smoothing)
    if rule == "constant":
        _check_update_inputs(weights, losses, reference_losses, step_size)
        return normalize_weights(weights)
    raise ValueError(f"rule must be one of {list(UPDATE_RULES)}, got {rule!r}")


# --------------------------------------------------------------------------------------------- scaling law
@dataclass(frozen=True)
class ScalingLawFit:
    """A fitted ``L(N) = a * N^-b + c`` (``N`` in parameters).

    Attributes:
        a: Scale of the reducible loss.
        b: Exponent (> 0).
        c: Irreducible loss.
        residual: Root-mean-square error of the fit on its points.

    Example:
        >>> fit = ScalingLawFit(a=400.0, b=0.3, c=1.7, residual=0.0)
        >>> round(fit.predict(7e9), 4)
        2.1452
    """

    a: float
    b: float
    c: float
    residual: float

    def predict(self, num_parameters: float) -> float:
        """Loss predicted for a model of ``num_parameters`` parameters."""
        if not num_parameters > 0:
            raise ValueError(f"num_parameters must be positive, got {num_parameters!r}")
        return self.a * float(num_parameters) ** (-self.b) + self.c


def fit_scaling_law(num_parameters: Sequence[float], losses: Sequence[float]) -> ScalingLawFit:
    """Fit ``L(N) = a * N^-b + c`` (``a, b > 0``, ``c >= 0``) by least squares (``scipy.optimize.curve_fit``).

    Args:
        num_parameters: Sizes of three or more models of one family, distinct and positive.
        losses: Their losses on one domain, same order.

    Returns:
        A :class:`ScalingLawFit`.

    Raises:
        ValueError: Fewer than three points, mismatched lengths, repeated or non-positive sizes.
        ImportError: scipy is not installed.

    Example:
        >>> sizes = [1e8, 3e8, 1e9, 3e9]
        >>> fit = fit_scaling_law(sizes, [100 * n**-0.25 + 1.5 for n in sizes])  # doctest: +SKIP
        >>> round(fit.predict(7e9), 3)  # doctest: +SKIP
        1.844
    """
    try:
        import numpy as np
        from scipy.optimize import OptimizeWarning, curve_fit
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("fit_scaling_law needs scipy: pip install 'scipy>=1.11'") from error

    sizes = np.asarray(num_parameters, dtype=np.float64).ravel()
    values = np.asarray(losses, dtype=np.float64).ravel()
    if sizes.size < 3 or sizes.size != values.size:
        raise ValueError(
            f"num_parameters and losses need the same length >= 3, got {sizes.size} and {values.size} points"
        )
    if not (np.isfinite(sizes).all() and (sizes > 0).all() and np.unique(sizes).size == sizes.size):
        raise ValueError(f"num_parameters must be distinct positive numbers, got {sizes.tolist()}")
    if not np.isfinite(values).all():
        raise ValueError(f"losses must be finite, got {values.tolist()}")

    # Fit in units of the smallest size, so that a stays O(loss) and the optimiser is well scaled.
    scale = sizes.min()
    x = sizes / scale

    def law(n, a, b, c):
        return a * n ** (-b) + c

    spread = max(values.max() - values.min(), 1e-6)
    p0 = (spread * 2.0, 0.5, max(values.min() - spread, 0.0))
    with warnings.catch_warnings():  # three points fit exactly: scipy then warns that it has no covariance
        warnings.simplefilter("ignore", OptimizeWarning)
        bounds = ([0.0, 1e-6, 0.0], [np.inf, 10.0, np.inf])
        params, _ = curve_fit(law, x, values, p0=p0, bounds=bounds, maxfev=20000)
    a, b, c = (float(p) for p in params)
    residual = float(np.sqrt(np.mean((law(x, a, b, c) - values) ** 2)))
    return ScalingLawFit(a=a * scale**b, b=b, c=c, residual=residual)


def scaling_law_reference_losses(
    num_parameters: Sequence[float], domain_losses: Mapping[str, Sequence[float]], target_parameters: float
) -> dict[str, float]:
    """Reference losses for a model of ``target_parameters`` from per-domain scaling-law fits.

    Args:
        num_parameters: Sizes of the fitted models (three or more).
        domain_losses: For each domain, the losses of those models, same order as ``num_parameters``.
        target_parameters: Size of the model being trained (e.g. the pruning target).

    Returns:
        ``{domain: predicted loss}``.

    Example:
        >>> sizes = [1e8, 3e8, 1e9]
        >>> losses = {"code": [1.9, 1.6, 1.4], "book": [3.1, 2.8, 2.6]}
        >>> sorted(scaling_law_reference_losses(sizes, losses, 5e8))  # doctest: +SKIP
        ['book', 'code']
    """
    if not domain_losses:
        raise ValueError("domain_losses must name at least one domain, got an empty mapping")
    if not (
        isinstance(target_parameters, (int, float)) and math.isfinite(target_parameters) and target_parameters > 0
    ):
        raise ValueError(f"target_parameters must be a positive number, got {target_parameters!r}")
    return {
        domain: fit_scaling_law(num_parameters, losses).predict(target_parameters)
        for domain, losses in domain_losses.items()
    }
