"""Input statistics of a linear layer, shared between layers that read the same input.

A method declares the statistic it needs when it is registered (:func:`optimum_admm.registry.register_method`),
and the driver collects exactly that, once per distinct input:

- ``"gram"``: the Gram matrix ``G = X^T X`` (fp32, in x in, summed over every calibration token): ADMM, SparseGPT;
- ``"input_norms"``: the squared input-channel norms ``sum_t x_tj^2`` (fp32, in): Wanda. The Gram's diagonal, at
  O(in) memory instead of O(in^2) (for a 70B ``down_proj``, 115 KB instead of 3.3 GB);
- ``None``: nothing (magnitude);
- or any factory ``(in_features, device) -> accumulator`` whose accumulator has ``add(inputs)``, ``num_tokens``
  and ``value`` (what the method's function receives).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from .errors import InvalidArgumentError
from .masks import row_chunks

__all__ = [
    "GramAccumulator",
    "InputNormAccumulator",
    "Statistic",
    "StatisticAccumulator",
    "resolve_statistic",
    "relative_reconstruction_error",
    "masked_reconstruction_error",
]


class StatisticAccumulator(Protocol):
    """What the driver needs of an accumulator: it adds each input batch and hands ``value`` to the method."""

    num_tokens: int

    def add(self, inputs: torch.Tensor) -> None: ...

    @property
    def value(self) -> Any: ...


#: A declared statistic: a built-in name or a factory ``(in_features, device) -> accumulator``.
Statistic = str | Callable[[int, torch.device], StatisticAccumulator] | None


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

    @property
    def value(self) -> torch.Tensor:
        """The Gram matrix ``(in, in)``."""
        return self.gram


class InputNormAccumulator:
    """Accumulates the squared norm of every input channel, ``sum_t x_tj^2``, in fp32 (the Gram's diagonal).

    Example:
        >>> acc = InputNormAccumulator(3)
        >>> acc.add(torch.ones(2, 5, 3))
        >>> acc.value.tolist(), acc.num_tokens
        ([10.0, 10.0, 10.0], 10)
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.squared_norms = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add the tokens of ``inputs`` (``(..., in_features)``)."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(device=self.squared_norms.device, dtype=torch.float32)
        self.squared_norms.add_(x.square().sum(dim=0))
        self.num_tokens += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        """The squared input-channel norms ``(in,)``."""
        return self.squared_norms


_BUILT_IN: dict[str, Callable[[int, torch.device], StatisticAccumulator]] = {
    "gram": GramAccumulator,
    "input_norms": InputNormAccumulator,
}


def resolve_statistic(statistic: Statistic) -> Callable[[int, torch.device], StatisticAccumulator] | None:
    """The accumulator factory of a declared statistic (``None`` for a method that reads no inputs).

    Example:
        >>> resolve_statistic("input_norms") is InputNormAccumulator
        True
    """
    if statistic is None:
        return None
    if isinstance(statistic, str):
        if statistic not in _BUILT_IN:
            raise InvalidArgumentError(
                f"statistic={statistic!r} is unknown; allowed: {sorted(_BUILT_IN)}, None or a factory"
            )
        return _BUILT_IN[statistic]
    if callable(statistic):
        return statistic
    raise InvalidArgumentError(f"statistic={statistic!r} is invalid; allowed: {sorted(_BUILT_IN)}, None or a factory")


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
