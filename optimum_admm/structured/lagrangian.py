"""The Lagrangian that steers the expected model shape to the target (Sheared-LLaMA, https://arxiv.org/abs/2310.06694).

From the closed-form keep probabilities ``p = P(z != 0)`` of the hard-concrete gates, the expected sparsity is

    s_hat_l = 1 - sum_j p_lj / U        per layer for heads (U = KV groups or query heads) and FFN channels,
    s_hat   = 1 - sum_j p_j / N         globally for layers and hidden channels,

and each structure adds, averaged over its rows,

    lambda1 * (s_hat - t) + lambda2 * (s_hat - t)^2,

with ``t = 1 - target / source`` ramping linearly from 0 over the first ``warmup`` fraction of the steps. The model
weights and gate logits minimise this; the multipliers maximise it (gradient ascent, done here by negating their
gradient so that any ordinary optimiser with a positive learning rate ascends). With ``s_hat < t`` (not sparse
enough) ascent drives ``lambda1`` negative and ``lambda2`` up, and the penalty's gradient then lowers the gate logits.

Example:
    >>> import torch
    >>> round(float(lagrangian_penalty(torch.tensor(0.1), 0.5, torch.tensor(-1.0), torch.tensor(2.0))), 4)
    0.72
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .configuration import ShearingPlan

__all__ = [
    "LagrangianMultipliers",
    "expected_shape",
    "expected_sparsity",
    "lagrangian_penalty",
    "warmup_target",
]


def expected_sparsity(keep_probability: torch.Tensor) -> torch.Tensor:
    """``1 - mean(p)`` over the last dimension: one value per row (heads, FFN) or a scalar (layers, hidden).

    Example:
        >>> expected_sparsity(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
        tensor([0.5000, 0.5000])
    """
    return 1.0 - keep_probability.mean(dim=-1)


def warmup_target(final_target: float, step: int, total_steps: int, warmup: float) -> float:
    """The target sparsity at ``step``: linear from 0 to ``final_target`` over ``warmup * total_steps`` steps.

    Example:
        >>> warmup_target(0.5, step=10, total_steps=100, warmup=0.2)
        0.25
        >>> warmup_target(0.5, step=50, total_steps=100, warmup=0.2)
        0.5
    """
    ramp = warmup * total_steps
    if ramp <= 0:
        return final_target
    return final_target * min(1.0, step / ramp)


def lagrangian_penalty(
    sparsity: torch.Tensor, target: float, lambda_1: torch.Tensor, lambda_2: torch.Tensor
) -> torch.Tensor:
    """``mean(lambda_1 * (s - t) + lambda_2 * (s - t) ** 2)`` over the rows of ``sparsity``."""
    gap = sparsity - target
    return (lambda_1 * gap + lambda_2 * gap.pow(2)).mean()


def expected_shape(keep_probabilities: Mapping[str, torch.Tensor], plan: ShearingPlan) -> dict[str, float]:
    """The expected target dimensions implied by the keep probabilities (ungated dimensions stay at the source's).

    Example:
        >>> from transformers import LlamaConfig
        >>> from optimum_admm.structured import ShearingConfig
        >>> plan = ShearingConfig(num_hidden_layers=1).plan(LlamaConfig(hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, vocab_size=10))
        >>> expected_shape({"layer": torch.tensor([0.5, 1.0])}, plan)["num_hidden_layers"]
        1.5
    """
    shape = {name: float(value) for name, value in plan.source.items()}
    with torch.no_grad():
        if "layer" in keep_probabilities:
            shape["num_hidden_layers"] = float(keep_probabilities["layer"].sum())
        if "hidden" in keep_probabilities:
            shape["hidden_size"] = float(keep_probabilities["hidden"].sum())
        if "intermediate" in keep_probabilities:
            shape["intermediate_size"] = float(keep_probabilities["intermediate"].sum(-1).mean())
        if "head" in keep_probabilities:
            units = float(keep_probabilities["head"].sum(-1).mean())
            if plan.head_gating == "kv_group":
                group = plan.source["num_attention_heads"] // plan.source["num_key_value_heads"]
                shape["num_key_value_heads"], shape["num_attention_heads"] = units, units * group
            else:
                shape["num_attention_heads"] = units
    return shape


def _negate(grad: torch.Tensor) -> torch.Tensor:
    return -grad


class LagrangianMultipliers(nn.Module):
    """One ``(lambda_1, lambda_2)`` pair per structure, starting at 0, trained by gradient ascent.

    Their gradients are negated by a hook, so a descent optimiser with a positive learning rate maximises the
    Lagrangian over the multipliers.

    Example:
        >>> lam = LagrangianMultipliers(["layer", "head"])
        >>> loss = lam.penalty({"layer": torch.tensor(0.0), "head": torch.tensor([0.0, 0.0])},
        ...     {"layer": 0.5, "head": 0.5})
        >>> loss.backward()
        >>> float(lam.lambda_1["layer"].grad)  # d/dlambda_1 = s - t = -0.5, negated for ascent
        0.5
    """

    def __init__(self, structures: Iterable[str]) -> None:
        super().__init__()
        structures = list(structures)
        self.lambda_1 = nn.ParameterDict([(s, nn.Parameter(torch.zeros(()))) for s in structures])
        self.lambda_2 = nn.ParameterDict([(s, nn.Parameter(torch.zeros(()))) for s in structures])
        for param in self.parameters():
            param.register_hook(_negate)

    def penalty(self, sparsities: Mapping[str, torch.Tensor], targets: Mapping[str, float]) -> torch.Tensor:
        """Sum over structures of :func:`lagrangian_penalty`."""
        total = torch.zeros((), device=self.lambda_1[next(iter(self.lambda_1))].device)
        for name, sparsity in sparsities.items():
            total = total + lagrangian_penalty(sparsity, targets[name], self.lambda_1[name], self.lambda_2[name])
        return total

    def values(self) -> dict[str, float]:
        """``{"lambda_1/<structure>": ..., "lambda_2/<structure>": ...}`` for logging."""
        out = {}
        for name in self.lambda_1:
            out[f"lambda_1/{name}"] = float(self.lambda_1[name].detach())
            out[f"lambda_2/{name}"] = float(self.lambda_2[name].detach())
        return out
