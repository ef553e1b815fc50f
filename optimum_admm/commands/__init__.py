"""The ``optimum-cli admm`` plugin and the ``optimum-admm`` console script (argument parsing only; the work is
imported inside each command's ``run()``)."""

from .admm import ADMMCommand, EvaluateCommand, PruneCommand, ShearCommand
from .main import main

__all__ = ["ADMMCommand", "EvaluateCommand", "PruneCommand", "ShearCommand", "main"]
