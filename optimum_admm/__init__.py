"""optimum-admm: prune Hugging Face causal language models with ADMM and its baselines.

``import optimum_admm`` is light: the public names below are imported on first use (so ``optimum-cli`` and
``--help`` stay fast).

Example:
    >>> from optimum_admm import ADMMConfig, ADMMPruner
    >>> config = ADMMConfig(sparsity=0.5, mask_structure="2:4")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "ADMMConfig": "configuration",
    "MagnitudeConfig": "configuration",
    "PruningConfig": "configuration",
    "SparseGPTConfig": "configuration",
    "WandaConfig": "configuration",
    "ADMMPruner": "pruner",
    "register_method": "registry",
    "LayerReport": "reporting",
    "PruningReport": "reporting",
    "load_masks": "export",
    "load_pruning_config": "export",
    "perplexity": "evaluation",
    "inspect": "inspection",
    "InspectionReport": "inspection",
}

__all__ = [
    "ADMMConfig",
    "ADMMPruner",
    "InspectionReport",
    "LayerReport",
    "MagnitudeConfig",
    "PruningConfig",
    "PruningReport",
    "SparseGPTConfig",
    "WandaConfig",
    "__version__",
    "inspect",
    "load_masks",
    "load_pruning_config",
    "perplexity",
    "register_method",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .configuration import ADMMConfig, MagnitudeConfig, PruningConfig, SparseGPTConfig, WandaConfig
    from .evaluation import perplexity
    from .export import load_masks, load_pruning_config
    from .inspection import InspectionReport, inspect
    from .pruner import ADMMPruner
    from .registry import register_method
    from .reporting import LayerReport, PruningReport


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
