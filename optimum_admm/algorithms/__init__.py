"""Pruning algorithms: pure tensor functions, one paper each. No hooks, devices, files or progress bars here."""

from .admm import admm_prune, admm_prune_group
from .magnitude import magnitude_mask, magnitude_prune
from .sparsegpt import sparsegpt_prune, sparsegpt_prune_group
from .wanda import wanda_mask, wanda_prune

__all__ = [
    "admm_prune",
    "admm_prune_group",
    "magnitude_mask",
    "magnitude_prune",
    "sparsegpt_prune",
    "sparsegpt_prune_group",
    "wanda_mask",
    "wanda_prune",
]
