"""Hard-concrete gates (Louizos, Welling & Kingma 2018, https://arxiv.org/abs/1712.01312), as used by Sheared-LLaMA.

Each gate entry has a log-odds parameter ``a``. With temperature ``beta`` and stretch limits ``gamma < 0 < 1 < zeta``:

    u ~ U(eps, 1 - eps)
    s = sigmoid((log u - log(1 - u) + a) / beta)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)

so ``z`` is exactly 0 or exactly 1 with positive probability, with closed forms

    P(z != 0) = sigmoid(a - beta * log(-gamma / zeta))          (= sigmoid(a + beta ln 11) for the defaults)
    P(z == 1) = sigmoid(a - beta * log((1 - gamma) / (zeta - 1)))  (= sigmoid(a - beta ln 11))

The deterministic value used when finalising is ``sigmoid(scale * a / beta)`` (``scale = 0.8`` in the reference).

Example:
    >>> import torch
    >>> a = torch.tensor([4.6, -4.6])
    >>> prob_nonzero(a, temperature=2 / 3, limit_left=-0.1, limit_right=1.1).round(decimals=3)
    tensor([0.9980, 0.0470])
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "HardConcreteGates",
    "deterministic_value",
    "prob_nonzero",
    "prob_one",
    "sample_hard_concrete",
]


def sample_hard_concrete(
    log_alpha: torch.Tensor,
    *,
    temperature: float,
    limit_left: float,
    limit_right: float,
    epsilon: float = 1e-6,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one hard-concrete sample per entry of ``log_alpha`` (differentiable in ``log_alpha``).

    Example:
        >>> z = sample_hard_concrete(torch.zeros(1000), temperature=2 / 3, limit_left=-0.1, limit_right=1.1)
        >>> bool(((z >= 0) & (z <= 1)).all())
        True
    """
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=torch.float32)
    u = u.clamp(epsilon, 1.0 - epsilon)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.float()) / temperature)
    return _stretch(s, limit_left, limit_right)


def _stretch(s: torch.Tensor, limit_left: float, limit_right: float) -> torch.Tensor:
    """``clamp(s * (zeta - gamma) + gamma, 0, 1)``: the stretched, hard-clipped gate value."""
    return (s * (limit_right - limit_left) + limit_left).clamp(0.0, 1.0)


def prob_nonzero(
    log_alpha: torch.Tensor, *, temperature: float, limit_left: float, limit_right: float
) -> torch.Tensor:
    """Closed-form ``P(z != 0)``: the keep probability used for the expected sparsity.

    Example:
        >>> float(prob_nonzero(torch.tensor(0.0), temperature=1.0, limit_left=-1.0, limit_right=1.0))
        0.5
    """
    return torch.sigmoid(log_alpha.float() - temperature * math.log(-limit_left / limit_right))


def prob_one(log_alpha: torch.Tensor, *, temperature: float, limit_left: float, limit_right: float) -> torch.Tensor:
    """Closed-form ``P(z == 1)``.

    Example:
        >>> round(float(prob_one(torch.tensor(0.0), temperature=1.0, limit_left=-1.0, limit_right=2.0)), 4)  # 1/3
        0.3333
    """
    return torch.sigmoid(log_alpha.float() - temperature * math.log((1.0 - limit_left) / (limit_right - 1.0)))


def deterministic_value(log_alpha: torch.Tensor, *, temperature: float, scale: float = 0.8) -> torch.Tensor:
    """The soft value a surviving gate keeps when finalising: ``sigmoid(scale * a / temperature)``.

    Example:
        >>> float(deterministic_value(torch.tensor(0.0), temperature=2 / 3))
        0.5
    """
    return torch.sigmoid(scale * log_alpha.float() / temperature)


class HardConcreteGates(nn.Module):
    """The gate logits of every structure, in one module (fp32 parameters).

    Args:
        shapes: Gate shape per structure name, e.g. ``{"layer": (L,), "head": (L, U)}``.
        temperature: Hard-concrete temperature beta.
        limit_left: Stretch limit gamma (< 0).
        limit_right: Stretch limit zeta (> 1).
        epsilon: Uniform noise is drawn from ``U(epsilon, 1 - epsilon)``.
        init_log_alpha: Initial logit of every entry.
        log_alpha_range: ``(low, high)`` clamp applied in place before every use.

    Example:
        >>> gates = HardConcreteGates({"layer": (4,), "head": (4, 2)})
        >>> sorted(gates.sample())
        ['head', 'layer']
        >>> gates.keep_probabilities()["head"].shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        *,
        temperature: float = 2 / 3,
        limit_left: float = -0.1,
        limit_right: float = 1.1,
        epsilon: float = 1e-6,
        init_log_alpha: float = math.log(0.99 / 0.01),
        log_alpha_range: tuple[float, float] = (math.log(1e-2), math.log(1e2)),
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.limit_left = limit_left
        self.limit_right = limit_right
        self.epsilon = epsilon
        self.log_alpha_range = log_alpha_range
        # A list of pairs keeps the structures in the given order (a plain dict would be sorted).
        self.log_alpha = nn.ParameterDict(
            [(name, nn.Parameter(torch.full(shape, float(init_log_alpha)))) for name, shape in shapes.items()]
        )

    @property
    def structures(self) -> list[str]:
        """The gated structures, in insertion order."""
        return list(self.log_alpha.keys())

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every logit to ``log_alpha_range`` in place (does not cut the gradient path)."""
        for param in self.log_alpha.values():
            param.clamp_(*self.log_alpha_range)

    def _constants(self) -> dict[str, float]:
        return {"temperature": self.temperature, "limit_left": self.limit_left, "limit_right": self.limit_right}

    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One hard-concrete draw per entry, for every structure (clamps the logits first)."""
        self.clamp_()
        return {
            name: sample_hard_concrete(param, epsilon=self.epsilon, generator=generator, **self._constants())
            for name, param in self.log_alpha.items()
        }

    def median(self) -> dict[str, torch.Tensor]:
        """The noise-free draw (``u = 1/2``, so ``s = sigmoid(a / beta)``), differentiable and deterministic.

        For reproducibility checks (two launch configurations give bitwise comparable gradients) and debugging;
        training uses :meth:`sample`.
        """
        self.clamp_()
        return {
            name: _stretch(torch.sigmoid(param.float() / self.temperature), self.limit_left, self.limit_right)
            for name, param in self.log_alpha.items()
        }

    def keep_probabilities(self) -> dict[str, torch.Tensor]:
        """Closed-form ``P(z != 0)`` for every structure (differentiable)."""
        return {name: prob_nonzero(param, **self._constants()) for name, param in self.log_alpha.items()}

    @torch.no_grad()
    def binariness(self) -> dict[str, float]:
        """Mean probability mass at the end points, ``P(z = 0) + P(z = 1)``, per structure (1.0 = fully binary)."""
        out = {}
        for name, param in self.log_alpha.items():
            p_zero = 1.0 - prob_nonzero(param, **self._constants())
            out[name] = float((p_zero + prob_one(param, **self._constants())).mean())
        return out

    def deterministic_values(self, scale: float = 0.8) -> dict[str, torch.Tensor]:
        """``sigmoid(scale * a / temperature)`` per structure (before the top-k)."""
        return {
            name: deterministic_value(param.detach(), temperature=self.temperature, scale=scale)
            for name, param in self.log_alpha.items()
        }
