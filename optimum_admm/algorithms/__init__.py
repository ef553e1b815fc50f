"""Pruning algorithms: pure tensor functions, one paper each. No hooks, devices, files or progress bars here."""

from .admm import admm_prune
from .magnitude import magnitude_mask, magnitude_prune
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_mask, wanda_prune

__all__ = ["admm_prune", "magnitude_mask", "magnitude_prune", "sparsegpt_prune", "wanda_mask", "wanda_prune"]
