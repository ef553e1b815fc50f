"""optimum-admm: prune Hugging Face causal language models with ADMM and its baselines.

Example:
    >>> from optimum_admm import ADMMConfig, ADMMPruner
    >>> config = ADMMConfig(sparsity=0.5, mask_structure="2:4")
"""

from .configuration import ADMMConfig, MagnitudeConfig, PruningConfig, SparseGPTConfig, WandaConfig
from .pruner import ADMMPruner
from .registry import register_method
from .reporting import LayerReport, PruningReport
from .version import __version__

__all__ = [
    "ADMMConfig",
    "ADMMPruner",
    "LayerReport",
    "MagnitudeConfig",
    "PruningConfig",
    "PruningReport",
    "SparseGPTConfig",
    "WandaConfig",
    "register_method",
    "__version__",
]
