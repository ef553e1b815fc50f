"""Which algorithm prunes a layer for which config type, and which input statistic it needs.

Methods are registered once each, by unique name (the config class's ``method``): a second registration of a name
is refused, so a user's config class never takes over the recipes of another. Adding a method is one config class,
one algorithm module and one :func:`register_method` call; the driver never asks which method it runs. A method
declares the statistic it needs (:mod:`optimum_admm.stats`: ``"gram"``, ``"input_norms"``, ``None`` or a factory),
and the driver collects exactly that. A method that only removes weights (no update of the others) may also register
its keep-mask function: the driver then zeroes the pruned weights in place, without a pruned copy of the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .algorithms import (
    admm_prune_group,
    magnitude_mask,
    magnitude_prune,
    sparsegpt_prune_group,
    wanda_mask,
    wanda_prune,
)
from .configuration import (
    ADMMConfig,
    MagnitudeConfig,
    PruningConfig,
    SparseGPTConfig,
    WandaConfig,
    add_config_class,
    config_classes,
)
from .errors import InvalidArgumentError
from .stats import Statistic, StatisticAccumulator, resolve_statistic

__all__ = [
    "LayerGroupFn",
    "LayerMaskFn",
    "LayerPruneFn",
    "MethodSpec",
    "register_method",
    "get_method",
    "get_mask_method",
    "get_spec",
    "config_class_for",
    "registered_methods",
]

#: ``fn(weight (out, in), statistic value or None, config) -> pruned weight``.
LayerPruneFn = Callable[[torch.Tensor, "torch.Tensor | None", PruningConfig], torch.Tensor]

#: ``fn([weight (out_i, in)], shared statistic value, [config_i]) -> [pruned weight_i]``: several layers that read the
#: same input solved together (the configs differ at most in ``sparsity``); must equal ``fn`` per layer.
LayerGroupFn = Callable[[list[torch.Tensor], "torch.Tensor | None", list[PruningConfig]], list[torch.Tensor]]

#: ``fn(weight (out, in), statistic value or None, config) -> keep mask`` (bool, the weight's shape): for methods
#: whose pruned weight is ``weight.masked_fill(~keep, 0)``.
LayerMaskFn = Callable[[torch.Tensor, "torch.Tensor | None", PruningConfig], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, config class, layer functions and the statistic it reads.

    Example:
        >>> from optimum_admm import WandaConfig
        >>> get_spec(WandaConfig()).statistic_name
        'input_norms'
    """

    name: str
    config_class: type[PruningConfig]
    prune_fn: LayerPruneFn
    mask_fn: LayerMaskFn | None
    statistic: Callable[[int, torch.device], StatisticAccumulator] | None
    statistic_name: str
    group_fn: LayerGroupFn | None = None

    @property
    def needs_calibration(self) -> bool:
        """Whether the driver must run calibration data through the blocks for this method."""
        return self.statistic is not None


_SPECS: dict[str, MethodSpec] = {}


def register_method(
    config_cls: type[PruningConfig],
    fn: LayerPruneFn,
    *,
    mask_fn: LayerMaskFn | None = None,
    statistic: Statistic = "gram",
    group_fn: LayerGroupFn | None = None,
) -> MethodSpec:
    """Register the layer-pruning function run for configs of type ``config_cls``, under ``config_cls.method``.

    Args:
        config_cls: the method's config class; its ``method`` class variable is the unique name.
        fn: ``fn(weight, statistic, config) -> pruned weight``.
        mask_fn: for methods that only remove weights, the keep-mask ``fn`` applies; the driver then calls it
            instead of ``fn`` and zeroes the weight in place (``fn`` must equal ``weight.masked_fill(~mask, 0)``).
        statistic: what the method reads of each layer's inputs (see :mod:`optimum_admm.stats`); ``None`` for a
            method that reads no calibration data (its config must say ``needs_calibration = False``).
        group_fn: optionally, ``group_fn(weights, statistic, configs) -> pruned weights`` for layers that share one
            input (and so one statistic): the driver calls it once for such a group (q/k/v, gate/up) so the method can
            factorise once and stack their rows. It must equal ``fn`` layer by layer, within float tolerance.

    Raises:
        ValueError: for a name registered already, a bad argument or a statistic that contradicts the config.

    Example:
        >>> from dataclasses import dataclass
        >>> from typing import ClassVar
        >>> from optimum_admm import WandaConfig
        >>> @dataclass
        ... class MyWandaConfig(WandaConfig):
        ...     method: ClassVar[str] = "my-wanda"
        >>> spec = register_method(MyWandaConfig, get_method(WandaConfig()), statistic="input_norms")  # doctest: +SKIP
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, PruningConfig)):
        raise InvalidArgumentError(f"config_cls={config_cls!r} is invalid; allowed: a PruningConfig subclass")
    name = config_cls.method
    if name in _SPECS:
        raise InvalidArgumentError(
            f"method {name!r} is registered already (by {_SPECS[name].config_class.__qualname__}); give "
            f"{config_cls.__qualname__} its own `method: ClassVar[str] = ...` name"
        )
    if not callable(fn):
        raise InvalidArgumentError(f"fn={fn!r} is invalid; allowed: a callable")
    if mask_fn is not None and not callable(mask_fn):
        raise InvalidArgumentError(f"mask_fn={mask_fn!r} is invalid; allowed: a callable or None")
    if group_fn is not None and not callable(group_fn):
        raise InvalidArgumentError(f"group_fn={group_fn!r} is invalid; allowed: a callable or None")
    factory = resolve_statistic(statistic)
    if (factory is not None) != config_cls.needs_calibration:
        raise InvalidArgumentError(
            f"statistic={statistic!r} contradicts {config_cls.__qualname__}.needs_calibration="
            f"{config_cls.needs_calibration}; a method reads calibration data exactly when it declares a statistic"
        )
    label = statistic if isinstance(statistic, str) or statistic is None else getattr(statistic, "__name__", "custom")
    spec = MethodSpec(name, config_cls, fn, mask_fn, factory, str(label), group_fn)
    add_config_class(config_cls)
    _SPECS[name] = spec
    return spec


def get_spec(config: PruningConfig) -> MethodSpec:
    """The registration for ``config``: its own class's, else the nearest registered base class's."""
    registered = {spec.config_class: spec for spec in _SPECS.values()}
    for cls in type(config).__mro__:
        if cls in registered:
            return registered[cls]
    raise InvalidArgumentError(
        f"config of type {type(config).__name__} has no registered method; registered: "
        f"{sorted(spec.config_class.__name__ for spec in _SPECS.values())}"
    )


def get_method(config: PruningConfig) -> LayerPruneFn:
    """The layer-pruning function for ``config`` (looked up by its type, most specific first)."""
    return get_spec(config).prune_fn


def get_mask_method(config: PruningConfig) -> LayerMaskFn | None:
    """The keep-mask function registered with the method for ``config``, or ``None`` (the method updates weights).

    Example:
        >>> from optimum_admm import ADMMConfig, WandaConfig
        >>> get_mask_method(ADMMConfig()) is None, callable(get_mask_method(WandaConfig()))
        (True, True)
    """
    return get_spec(config).mask_fn


def registered_methods() -> dict[str, type[PruningConfig]]:
    """``{method name: config class}`` of every registered method."""
    return {name: spec.config_class for name, spec in _SPECS.items()}


def config_class_for(method: str | None) -> type[PruningConfig]:
    """The config class registered under ``method`` (the ``"method"`` key of a saved recipe)."""
    classes = config_classes()
    if method not in classes:
        raise InvalidArgumentError(f"method={method!r} is unknown; allowed: {sorted(classes)}")
    return classes[method]


def _admm_group(
    weights: list[torch.Tensor], gram: torch.Tensor | None, configs: list[ADMMConfig]
) -> list[torch.Tensor]:
    c = configs[0]
    return admm_prune_group(
        weights,
        gram,
        [config.sparsity for config in configs],
        nm=c.nm,
        schedule=c.schedule,
        iterations=c.iterations,
        mask_iterations=c.mask_iterations,
        rho=c.rho,
        dampening=c.dampening,
        per_output=c.per_output,
    )


def _sparsegpt_group(
    weights: list[torch.Tensor], gram: torch.Tensor | None, configs: list[SparseGPTConfig]
) -> list[torch.Tensor]:
    c = configs[0]
    return sparsegpt_prune_group(
        weights, gram, [config.sparsity for config in configs], nm=c.nm, block_size=c.block_size, dampening=c.dampening
    )


def _admm(weight: torch.Tensor, gram: torch.Tensor | None, config: ADMMConfig) -> torch.Tensor:
    return _admm_group([weight], gram, [config])[0]


def _sparsegpt(weight: torch.Tensor, gram: torch.Tensor | None, config: SparseGPTConfig) -> torch.Tensor:
    return _sparsegpt_group([weight], gram, [config])[0]


def _wanda(weight: torch.Tensor, gram: torch.Tensor | None, config: WandaConfig) -> torch.Tensor:
    return wanda_prune(weight, gram, config.sparsity, nm=config.nm, per_output=config.per_output)


def _wanda_mask(weight: torch.Tensor, gram: torch.Tensor | None, config: WandaConfig) -> torch.Tensor:
    return wanda_mask(weight, gram, config.sparsity, nm=config.nm, per_output=config.per_output)


def _magnitude(weight: torch.Tensor, gram: torch.Tensor | None, config: MagnitudeConfig) -> torch.Tensor:
    return magnitude_prune(weight, config.sparsity, nm=config.nm, per_output=config.per_output)


def _magnitude_mask(weight: torch.Tensor, gram: torch.Tensor | None, config: MagnitudeConfig) -> torch.Tensor:
    return magnitude_mask(weight, config.sparsity, nm=config.nm, per_output=config.per_output)


register_method(ADMMConfig, _admm, statistic="gram", group_fn=_admm_group)
register_method(SparseGPTConfig, _sparsegpt, statistic="gram", group_fn=_sparsegpt_group)
register_method(WandaConfig, _wanda, mask_fn=_wanda_mask, statistic="input_norms")
register_method(MagnitudeConfig, _magnitude, mask_fn=_magnitude_mask, statistic=None)
