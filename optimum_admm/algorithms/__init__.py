"""Pruning algorithms: pure tensor functions, one paper each. No hooks, devices, files or progress bars here."""

from .admm import admm_prune
from .magnitude import magnitude_prune
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_prune

__all__ = ["admm_prune", "magnitude_prune", "sparsegpt_prune", "wanda_prune"]
