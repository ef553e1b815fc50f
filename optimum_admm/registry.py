"""Which algorithm prunes a layer for which config type. The driver never asks which method it runs.

Adding a method is one config class, one algorithm module and one :func:`register_method` call. A method that only
removes weights (no update of the others) may also register its keep-mask function: the driver then zeroes the
pruned weights in place, without a pruned copy of the layer, which lowers the peak memory of large layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .algorithms import admm_prune, magnitude_mask, magnitude_prune, sparsegpt_prune, wanda_mask, wanda_prune
from .configuration import ADMMConfig, MagnitudeConfig, PruningConfig, SparseGPTConfig, WandaConfig

__all__ = [
    "LayerMaskFn",
    "LayerPruneFn",
    "register_method",
    "get_method",
    "get_mask_method",
    "config_class_for",
    "registered_methods",
]

#: ``fn(weight (out, in), gram (in, in) or None, config) -> pruned weight``.
LayerPruneFn = Callable[[torch.Tensor, "torch.Tensor | None", PruningConfig], torch.Tensor]

#: ``fn(weight (out, in), gram (in, in) or None, config) -> keep mask`` (bool, the weight's shape): for methods
#: whose pruned weight is ``weight.masked_fill(~keep, 0)``.
LayerMaskFn = Callable[[torch.Tensor, "torch.Tensor | None", PruningConfig], torch.Tensor]

_METHODS: dict[type[PruningConfig], LayerPruneFn] = {}
_MASKS: dict[type[PruningConfig], LayerMaskFn] = {}


def register_method(config_cls: type[PruningConfig], fn: LayerPruneFn, *, mask_fn: LayerMaskFn | None = None) -> None:
    """Register the layer-pruning function run for configs of type ``config_cls``.

    ``mask_fn``, for methods that only remove weights, returns the keep-mask ``fn`` applies; when given, the driver
    calls it instead of ``fn`` and zeroes the weight in place (``fn`` must then equal
    ``weight.masked_fill(~mask_fn(...), 0)``).

    Example:
        >>> from optimum_admm.registry import get_method
        >>> from optimum_admm import ADMMConfig
        >>> callable(get_method(ADMMConfig()))
        True
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, PruningConfig)):
        raise ValueError(f"config_cls={config_cls!r} is invalid; allowed: a PruningConfig subclass")
    if mask_fn is not None and not callable(mask_fn):
        raise ValueError(f"mask_fn={mask_fn!r} is invalid; allowed: a callable or None")
    _METHODS[config_cls] = fn
    if mask_fn is None:
        _MASKS.pop(config_cls, None)
    else:
        _MASKS[config_cls] = mask_fn


def _registered_class(config: PruningConfig) -> type[PruningConfig] | None:
    """The most specific class of ``config`` with a registered method."""
    return next((cls for cls in type(config).__mro__ if cls in _METHODS), None)


def get_method(config: PruningConfig) -> LayerPruneFn:
    """The layer-pruning function for ``config`` (looked up by its type, most specific first)."""
    cls = _registered_class(config)
    if cls is not None:
        return _METHODS[cls]
    raise ValueError(
        f"config of type {type(config).__name__} has no registered method; registered: "
        f"{sorted(c.__name__ for c in _METHODS)}"
    )


def get_mask_method(config: PruningConfig) -> LayerMaskFn | None:
    """The keep-mask function registered with the method for ``config``, or ``None`` (the method updates weights).

    Example:
        >>> from optimum_admm import ADMMConfig, WandaConfig
        >>> get_mask_method(ADMMConfig()) is None, callable(get_mask_method(WandaConfig()))
        (True, True)
    """
    cls = _registered_class(config)
    return None if cls is None else _MASKS.get(cls)


def registered_methods() -> dict[str, type[PruningConfig]]:
    """``{method name: config class}`` of every registered method."""
    return {cls.method: cls for cls in _METHODS}


def config_class_for(method: str | None) -> type[PruningConfig]:
    """The config class registered under ``method`` (the ``"method"`` key of a saved recipe)."""
    methods = registered_methods()
    if method not in methods:
        raise ValueError(f"method={method!r} is unknown; allowed: {sorted(methods)}")
    return methods[method]


def _admm(weight: torch.Tensor, gram: torch.Tensor | None, config: ADMMConfig) -> torch.Tensor:
    return admm_prune(
        weight,
        gram,
        sparsity=config.sparsity,
        nm=config.nm,
        schedule=config.schedule,
        iterations=config.iterations,
        mask_iterations=config.mask_iterations,
        rho=config.rho,
        dampening=config.dampening,
        per_output=config.per_output,
    )


def _sparsegpt(weight: torch.Tensor, gram: torch.Tensor | None, config: SparseGPTConfig) -> torch.Tensor:
    return sparsegpt_prune(
        weight, gram, config.sparsity, nm=config.nm, block_size=config.block_size, dampening=config.dampening
    )


def _wanda(weight: torch.Tensor, gram: torch.Tensor | None, config: WandaConfig) -> torch.Tensor:
    return wanda_prune(weight, gram, config.sparsity, nm=config.nm, per_output=config.per_output)


def _wanda_mask(weight: torch.Tensor, gram: torch.Tensor | None, config: WandaConfig) -> torch.Tensor:
    return wanda_mask(weight, gram, config.sparsity, nm=config.nm, per_output=config.per_output)


def _magnitude(weight: torch.Tensor, gram: torch.Tensor | None, config: MagnitudeConfig) -> torch.Tensor:
    return magnitude_prune(weight, config.sparsity, nm=config.nm, per_output=config.per_output)


def _magnitude_mask(weight: torch.Tensor, gram: torch.Tensor | None, config: MagnitudeConfig) -> torch.Tensor:
    return magnitude_mask(weight, config.sparsity, nm=config.nm, per_output=config.per_output)


register_method(ADMMConfig, _admm)
register_method(SparseGPTConfig, _sparsegpt)
register_method(WandaConfig, _wanda, mask_fn=_wanda_mask)
register_method(MagnitudeConfig, _magnitude, mask_fn=_magnitude_mask)
