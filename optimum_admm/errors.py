"""The errors optimum-admm raises for a user's mistake or an environment condition.

Every one subclasses :class:`OptimumADMMError`, and also the built-in exception a caller would catch for that kind of
problem (``ValueError`` for a bad value, ``OSError`` for files, the Hub and the disk), so existing ``except
ValueError`` code keeps working. Messages name the parameter, flag or file, the bad value and what is allowed or what
to do. The command line prints them as one ``error:`` line (exit 2 for a bad argument, 1 otherwise), never a
traceback (``--debug`` or ``OPTIMUM_ADMM_DEBUG=1`` shows it). See ``docs/troubleshooting.md``.

Example:
    >>> try:
    ...     raise InvalidArgumentError("rho=inf is invalid; allowed: a finite number > 0")
    ... except ValueError as err:
    ...     print(err)
    rho=inf is invalid; allowed: a finite number > 0
"""

from __future__ import annotations

__all__ = [
    "CalibrationDataError",
    "CheckpointMismatchError",
    "HubError",
    "InvalidArgumentError",
    "ModelLoadError",
    "NonFiniteWeightsError",
    "OptimumADMMError",
    "OutputDirectoryError",
    "UnprunedLayersError",
]


class OptimumADMMError(Exception):
    """Base class of every error optimum-admm raises on purpose."""

    #: The command line's exit status for this error.
    exit_code = 1


class InvalidArgumentError(OptimumADMMError, ValueError):
    """A parameter (or flag) has a value that is not allowed."""

    exit_code = 2


class ModelLoadError(OptimumADMMError, OSError):
    """The model cannot be loaded: a missing path, no or a broken ``config.json``, pickled weights only, remote code
    needed, offline mode, a missing or gated Hub repo."""


class CalibrationDataError(OptimumADMMError, ValueError):
    """The calibration (or evaluation) data cannot be used: unreadable, not text, too short, badly shaped tokens."""


class OutputDirectoryError(OptimumADMMError, OSError):
    """The output directory cannot be written: not creatable, not writable, too little free space."""


class CheckpointMismatchError(OptimumADMMError, ValueError):
    """A resume checkpoint was written by another recipe, model or calibration set."""


class HubError(OptimumADMMError, OSError):
    """The Hub refused or failed: no token, a repo that cannot be created, a server error."""


class NonFiniteWeightsError(OptimumADMMError, ValueError):
    """A weight of the model holds NaN or infinity (pruning would pass it on or mis-rank the weights)."""


class UnprunedLayersError(OptimumADMMError, RuntimeError):
    """A targeted layer was left dense (or far below the target sparsity)."""
