"""Sheared-LLaMA targeted structured pruning (Xia et al. 2023, https://arxiv.org/abs/2310.06694) for stock transformers.

Learn hard-concrete gates over layers, heads (whole KV groups or query heads), FFN channels and hidden channels with a
Lagrangian that steers the expected shape to a target, inside a ``transformers.Trainer``; then fold and slice to a
standard smaller model.

Example:
    >>> from optimum_admm.structured import ShearingConfig, ShearingTrainer, prune_to_shape  # doctest: +SKIP
    >>> config = ShearingConfig(num_hidden_layers=24, hidden_size=384, num_attention_heads=6,
    ...     num_key_value_heads=2, intermediate_size=1024)  # doctest: +SKIP
    >>> trainer = ShearingTrainer(model=model, args=args, shearing_config=config, train_dataset=data)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> small = prune_to_shape(model, trainer.shearing)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from .configuration import ShearingConfig, ShearingPlan
from .gating import ShearingModule
from .hard_concrete import HardConcreteGates
from .lagrangian import LagrangianMultipliers
from .masks import final_gates, topk_keep
from .prune_to_shape import prune_to_shape

# The Trainer integration, the one-call API and the baselines load on first use (transformers.Trainer is heavy).
_LAZY = {
    "ShearingCallback": "training",
    "ShearingTrainer": "training",
    "ShearingResult": "api",
    "pack_tokens": "api",
    "shear": "api",
    "norm_gates": "baselines",
    "random_gates": "baselines",
    # dynamic batch loading (Sheared-LLaMA section 4): usable by any multi-domain Trainer script
    "DynamicBatchLoadingCallback": "dynamic_batch_loading",
    "DynamicBatchLoadingConfig": "dynamic_batch_loading",
    "MultiDomainDataset": "dynamic_batch_loading",
    "domain_losses": "dynamic_batch_loading",
    "fit_scaling_law": "dynamic_batch_loading",
}

__all__ = [
    "DynamicBatchLoadingCallback",
    "DynamicBatchLoadingConfig",
    "HardConcreteGates",
    "LagrangianMultipliers",
    "MultiDomainDataset",
    "ShearingCallback",
    "ShearingConfig",
    "ShearingModule",
    "ShearingPlan",
    "ShearingResult",
    "ShearingTrainer",
    "domain_losses",
    "final_gates",
    "fit_scaling_law",
    "norm_gates",
    "pack_tokens",
    "prune_to_shape",
    "random_gates",
    "shear",
    "topk_keep",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
