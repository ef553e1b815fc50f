"""Baselines at the same target shape: random structured pruning and norm-based structured pruning.

Both return final gate values (1 kept, 0 pruned) for
:func:`~optimum_admm.structured.prune_to_shape.prune_to_shape`, with exactly the plan's counts per row.

Norm-based importance, one score per prunable unit (no training):

* head unit (a KV group with its query heads, or one query head): squared Frobenius norm of every weight it owns,
  the ``q/k/v_proj`` rows (k/v only for whole KV groups) and the ``o_proj`` columns;
* FFN channel ``j``: ``||gate_proj[j]|| * ||up_proj[j]|| * ||down_proj[:, j]||`` (its output scales with all three);
* hidden channel ``c``: squared norm of everything that reads or writes it (embedding column, the ``q/k/v/gate/up``
  columns, the ``o/down`` rows) times the mean of its RMSNorm weights;
* layer: block influence ``1 - cos(input, output)`` of the block on calibration tokens (Men et al. 2024,
  https://arxiv.org/abs/2403.03853), the block-importance proxy; needs ``input_ids``.

Example:
    >>> from transformers import LlamaConfig
    >>> from optimum_admm.structured import ShearingConfig
    >>> plan = ShearingConfig(intermediate_size=8).plan(LlamaConfig(hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, vocab_size=10))
    >>> gates = random_gates(plan, seed=0)
    >>> int(gates["intermediate"].sum())
    16
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling import get_weight_matrix
from .configuration import ShearingPlan
from .layout import BLOCK_NORMS, ModelLayout
from .masks import final_gates

__all__ = ["block_influence", "norm_gates", "norm_scores", "random_gates"]


def random_gates(plan: ShearingPlan, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniformly random structured masks at the plan's target counts (seeded).

    Example:
        >>> from transformers import LlamaConfig
        >>> from optimum_admm.structured import ShearingConfig
        >>> source = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
        ...     num_key_value_heads=4)
        >>> plan = ShearingConfig(num_hidden_layers=3, intermediate_size=64).plan(source)
        >>> gates = random_gates(plan, seed=0)
        >>> int((gates["layer"] > 0).sum()), int((gates["intermediate"][0] > 0).sum())
        (3, 64)
    """
    generator = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(shape, generator=generator) for name, shape in plan.gate_shapes().items()}
    return final_gates(scores, plan)


def _sq_rows(weight: torch.Tensor, width: int) -> torch.Tensor:
    """Squared norm of consecutive blocks of ``width`` rows."""
    return weight.float().pow(2).sum(1).reshape(-1, width).sum(1)


@torch.no_grad()
def block_influence(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``1 - mean cos(h_in, h_out)`` per decoder block over the tokens of ``input_ids`` (higher = more important)."""
    layout = ModelLayout.of(model)
    captured: dict[int, float] = {}

    def hook(index: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            captured[index] = float(1.0 - cos.mean())

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(layout.blocks)]
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return torch.tensor([captured[i] for i in range(len(layout.blocks))])


@torch.no_grad()
def norm_scores(
    model: nn.Module, plan: ShearingPlan, input_ids: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Norm-based importance per gated structure (see the module docstring).

    Raises:
        ValueError: when layers are pruned and no ``input_ids`` are given for the block-influence proxy.
    """
    layout = ModelLayout.of(model)
    dh = plan.head_dim
    group = plan.source["num_attention_heads"] // plan.source["num_key_value_heads"]
    head, inter = [], []
    hidden = get_weight_matrix(layout.embed).float().pow(2).sum(0)
    norm_weight = torch.zeros_like(hidden)
    for block in layout.blocks:
        q, k, v, o = (
            get_weight_matrix(layout.attn(block, n)).float() for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        )
        g, u, d = (get_weight_matrix(layout.mlp(block, n)).float() for n in ("gate_proj", "up_proj", "down_proj"))
        if plan.head_gating == "kv_group":
            head.append(_sq_rows(q, dh * group) + _sq_rows(k, dh) + _sq_rows(v, dh) + _sq_rows(o.T, dh * group))
        else:
            head.append(_sq_rows(q, dh) + _sq_rows(o.T, dh))
        inter.append(g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0))
        hidden += sum(w.pow(2).sum(0) for w in (q, k, v, g, u)) + o.pow(2).sum(1) + d.pow(2).sum(1)
        norm_weight += sum(get_weight_matrix(getattr(block, n)).float().abs() for n in BLOCK_NORMS)
    scores = {"head": torch.stack(head), "intermediate": torch.stack(inter)}
    final_norm = get_weight_matrix(layout.final_norm).float().abs()
    scores["hidden"] = hidden * (norm_weight + final_norm) / (2 * len(layout.blocks) + 1)
    if "layer" in plan.structures:
        if plan.target["num_hidden_layers"] < plan.source["num_hidden_layers"] and input_ids is None:
            raise ValueError("norm-based layer pruning needs input_ids for the block-influence proxy")
        n_layers = plan.source["num_hidden_layers"]
        scores["layer"] = block_influence(model, input_ids) if input_ids is not None else torch.ones(n_layers)
    return {name: scores[name].cpu() for name in plan.structures}


def norm_gates(model: nn.Module, plan: ShearingPlan, input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Norm-based structured masks at the plan's target counts (ties broken towards the lower index).

    Heads by the squared norm of the weights they own, FFN channels by ``‖gate_j‖·‖up_j‖·‖down_:,j‖``, hidden
    channels by the norms of every weight that reads or writes them, layers by block influence
    ``1 - cos(h_in, h_out)`` on ``input_ids`` (all layers score alike without them).

    Example:
        >>> gates = norm_gates(model, config.plan(model.config), input_ids=calibration_ids)  # doctest: +SKIP
        >>> small = prune_to_shape(model, gates)  # doctest: +SKIP
    """
    return final_gates(norm_scores(model, plan, input_ids), plan)
