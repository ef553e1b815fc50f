"""optimum-admm: prune Hugging Face causal language models with ADMM and its baselines."""

from .version import __version__

__all__ = ["__version__"]
