"""Pruning algorithms: pure tensor functions, one paper each. No hooks, devices, files or progress bars here."""

from .admm import admm_prune

__all__ = ["admm_prune"]
