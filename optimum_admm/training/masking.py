"""Keep a pruned model sparse while it trains: masks, gradient hooks and re-applied zeros.

A *mask* is a boolean tensor shaped like the parameter it belongs to: ``True`` where the weight is kept (and
trains), ``False`` where it was pruned and must stay exactly zero. Masks are keyed by parameter name as the plain
model names it (``"model.layers.0.mlp.down_proj.weight"``); the module name (without ``".weight"``) works too, and
wrapper prefixes (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, PEFT's ``base_model.model.`` and
``.base_layer``) are ignored when masks are matched to a model.

Three mechanisms keep a pruned weight at exactly zero under any optimizer:

1. a gradient hook on every masked parameter zeroes the pruned entries of each gradient contribution *before* it
   is accumulated into ``.grad``, so gradient accumulation, clipping, DDP's all-reduce and the optimizer only ever
   see masked gradients (and a loss scaler's inf/NaN check ignores pruned entries, which are never applied);
2. after each optimizer step the pruned entries are written to zero again (whatever the update rule did);
3. optimizer state shaped like a masked parameter (Adam moments, momentum buffers) is zeroed at the pruned entries
   when training starts (a resumed or reused optimizer); the masked gradients keep it at zero from then on.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2, bias=False)
    >>> with torch.no_grad():
    ...     layer.weight[:, :2] = 0.0
    >>> with keep_sparse(layer) as guard:
    ...     layer(torch.randn(3, 4)).sum().backward()
    >>> layer.weight.grad[:, :2].abs().sum().item()
    0.0
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..experts import expert_parameters, is_experts_module
from ..modeling import is_linear

__all__ = ["Masks", "SparsityGuard", "apply_masks_", "canonical_name", "keep_sparse", "masks_from_model"]

logger = logging.getLogger(__name__)

Masks = Mapping[str, torch.Tensor]
"""``{parameter name: bool tensor}``: ``True`` = kept, ``False`` = pruned (held at zero)."""

# Prefixes added by wrappers around the model, stripped (repeatedly) from the start of a parameter name.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
# Path segments that wrappers insert inside a name (PEFT's wrapped linear, FSDP and activation checkpointing).
_WRAPPER_SEGMENTS = ("base_layer.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def canonical_name(name: str) -> str:
    """The parameter name a plain model would use, with wrapper prefixes and segments removed.

    Example:
        >>> canonical_name("module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
        'model.layers.0.self_attn.q_proj.weight'
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace("." + segment, ".")
        if name.startswith(segment):
            name = name[len(segment) :]
    return name


def _adapter_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes of PEFT adapter modules (``lora_A``, ``lora_B``, ...), which are never pruned."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attribute in module.adapter_layer_names:
                prefixes.append(f"{name}.{attribute}." if name else f"{attribute}.")
    return prefixes


def _check_min_sparsity(min_sparsity: float) -> None:
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity < 1:
        raise ValueError(f"min_sparsity={min_sparsity!r} is invalid; allowed: a number in [0, 1)")


def masks_from_model(model: nn.Module, *, min_sparsity: float = 0.0) -> dict[str, torch.Tensor]:
    """Masks from the exact zeros of a pruned model's linear (and ``Conv1D``) weights.

    Args:
        model: the pruned model (plain, or wrapped by DDP / PEFT; adapter weights such as LoRA's are skipped).
        min_sparsity: a weight gets a mask only when its fraction of exact zeros is above this (``0.0``: any zero).

    Returns:
        ``{canonical parameter name: bool tensor}``, ``True`` where the weight is non-zero.

    Raises:
        ValueError: ``min_sparsity`` outside ``[0, 1)``.

    Example:
        >>> layer = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
        >>> masks_from_model(nn.Sequential(layer))["0.weight"]
        tensor([[False,  True],
                [ True, False]])
    """
    from ..stores import store_for

    _check_min_sparsity(min_sparsity)
    adapters = _adapter_prefixes(model)
    store = store_for(model)  # offloaded weights are read from accelerate's weights map, not skipped as `meta`
    masks: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if any(f"{name}.".startswith(prefix) for prefix in adapters):
            continue
        if is_linear(module):
            weights = ["weight"]
        elif is_experts_module(module):  # fused experts: one 3-D mask per fused tensor
            weights = expert_parameters(module)
        else:
            continue
        for local in weights:
            key = f"{name}.{local}" if name else local
            weight = store.read(key)
            if weight.is_meta:
                continue
            kept = weight != 0
            if 1.0 - kept.float().mean().item() > min_sparsity:
                masks[canonical_name(key)] = kept
    logger.info("masks from exact zeros: %d weights", len(masks))
    return masks


def _as_bool_mask(key: str, mask: Any) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"masks[{key!r}] of type {type(mask).__name__} is invalid; allowed: a torch.Tensor")
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"masks[{key!r}] is invalid: a non-boolean mask must hold only 0 and 1")
    return mask != 0


def bind_masks(model: nn.Module, masks: Masks) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """Match ``masks`` to the parameters of ``model``: ``[(canonical name, parameter, pruned bool tensor)]``.

    Raises:
        ValueError: a mask names no parameter of the model, or its shape differs from the parameter's.
    """
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks of type {type(masks).__name__} is invalid; allowed: a dict of name -> bool tensor")
    lookup = {canonical_name(key): key for key in masks}
    bound, used, bound_ids = [], set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):  # tied weights answer to every name
        canonical = canonical_name(name)
        key = lookup.get(canonical)
        if key is None and canonical.endswith(".weight"):
            key = lookup.get(canonical[: -len(".weight")])
        if key is None or key in used:
            continue
        used.add(key)
        if id(param) in bound_ids:
            continue
        bound_ids.add(id(param))
        mask = _as_bool_mask(key, masks[key])
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(
                f"masks[{key!r}] has shape {tuple(mask.shape)}; parameter {name!r} has shape {tuple(param.shape)}"
            )
        bound.append((canonical, param, (~mask).to(param.device)))
    unmatched = sorted(set(masks) - used)
    if unmatched:
        names = [canonical_name(n) for n, _ in model.named_parameters()][:3]
        raise ValueError(
            f"masks keys {unmatched[:5]} ({len(unmatched)} in all) match no parameter of {type(model).__name__}; "
            f"its parameters are named like {names}"
        )
    return bound


def apply_masks_(model: nn.Module, masks: Masks) -> int:
    """Set the pruned entries of ``model``'s weights to exactly zero, in place.

    Args:
        model: the model (plain, or wrapped by DDP / PEFT).
        masks: ``{parameter name: bool tensor}`` (``True`` = kept), e.g. from :func:`masks_from_model`.

    Returns:
        How many pruned entries were non-zero before (``0`` when the model was already sparse).

    Raises:
        ValueError: a mask that is not a 0/1 tensor, names no parameter, or has the wrong shape.

    Example:
        >>> layer = nn.Linear(3, 1, bias=False)
        >>> apply_masks_(layer, {"weight": torch.tensor([[True, False, False]])})
        2
        >>> int((layer.weight == 0).sum())
        2
    """
    return SparsityGuard(model, masks).apply_()


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer and similar wrappers
    return optimizer


class SparsityGuard:
    """Hold a model's pruned weights at exactly zero while it trains (the engine of :func:`keep_sparse`).

    Args:
        model: the pruned model (plain, or wrapped by DDP / accelerate / PEFT).
        masks: ``{parameter name: bool tensor}`` (``True`` = kept); default: from the model's exact zeros.
        min_sparsity: with ``masks=None``, only weights with more exact zeros than this get a mask.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> guard = SparsityGuard(model, {"0.weight": torch.eye(4, dtype=torch.bool)})
        >>> guard.apply_()
        12
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        >>> with guard.attached(optimizer):
        ...     model(torch.randn(2, 4)).sum().backward()
        ...     optimizer.step()
        >>> guard.num_violations()
        0
    """

    def __init__(self, model: nn.Module, masks: Masks | None = None, *, min_sparsity: float = 0.0) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model of type {type(model).__name__} is invalid; allowed: a torch nn.Module")
        self.model = model
        if masks is None:
            masks = masks_from_model(model, min_sparsity=min_sparsity)
        self._bound = bind_masks(model, masks)
        self._handles: list[Any] = []

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{canonical parameter name: bool tensor}`` (``True`` = kept)."""
        return {name: ~pruned for name, _, pruned in self._bound}

    @property
    def num_pruned(self) -> int:
        """How many entries the masks hold at zero."""
        return sum(int(pruned.sum()) for _, _, pruned in self._bound)

    @property
    def is_attached(self) -> bool:
        """Whether gradient hooks are registered."""
        return bool(self._handles)

    def attach(self, optimizer: Any = None) -> SparsityGuard:
        """Register the gradient hooks; with an ``optimizer``, also re-apply the zeros after each of its steps.

        The optimizer's existing state is masked at once (useful after loading a checkpoint).
        """
        if self._handles:
            raise RuntimeError("this SparsityGuard is already attached; call detach() first")
        for _, param, pruned in self._bound:
            if param.requires_grad:
                self._handles.append(param.register_hook(_gradient_mask(pruned)))
        if optimizer is not None:
            self.mask_optimizer_state_(optimizer)
            self._handles.append(
                _unwrap_optimizer(optimizer).register_step_post_hook(lambda *_: self.apply_(count=False))
            )
        return self

    def detach(self) -> None:
        """Remove every hook this guard registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def attached(self, optimizer: Any = None) -> Iterator[SparsityGuard]:
        """``attach`` on entry; re-apply the zeros and ``detach`` on exit."""
        self.attach(optimizer)
        try:
            yield self
        finally:
            self.detach()
            self.apply_()

    @torch.no_grad()
    def apply_(self, count: bool = True) -> int:
        """Write zeros into the pruned entries; return how many were non-zero (``0`` with ``count=False``).

        ``count=False`` skips the count (one pass less over the weights), as after every optimizer step.
        """
        changed = 0
        for _, param, pruned in self._bound:
            pruned = pruned.to(param.device)
            if count:
                changed += int(param.data.masked_select(pruned).count_nonzero())
            param.data.masked_fill_(pruned, 0)
        return changed

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zero the pruned entries of ``.grad`` (a fallback where gradient hooks do not run)."""
        for _, param, pruned in self._bound:
            if param.grad is not None:
                param.grad.masked_fill_(pruned.to(param.grad.device), 0)

    @torch.no_grad()
    def num_gradient_violations(self) -> int:
        """How many pruned entries of ``.grad`` are non-zero (``0`` when the gradient hooks ran)."""
        return sum(
            int(param.grad.masked_select(pruned.to(param.grad.device)).count_nonzero())
            for _, param, pruned in self._bound
            if param.grad is not None
        )

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: Any) -> int:
        """Zero the pruned entries of every optimizer state tensor shaped like a masked parameter.

        Returns:
            How many state tensors were masked.
        """
        state = _unwrap_optimizer(optimizer).state
        count = 0
        for _, param, pruned in self._bound:
            for value in state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.masked_fill_(pruned.to(value.device), 0)
                    count += 1
        return count

    @torch.no_grad()
    def num_violations(self) -> int:
        """How many pruned entries are currently non-zero (``0`` while the guard does its job)."""
        return sum(
            int(param.data.masked_select(pruned.to(param.device)).count_nonzero()) for _, param, pruned in self._bound
        )


def _gradient_mask(pruned: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(pruned.to(grad.device), 0)

    return hook


@contextlib.contextmanager
def keep_sparse(
    model: nn.Module, masks: Masks | None = None, *, optimizer: Any = None, min_sparsity: float = 0.0
) -> Iterator[SparsityGuard]:
    """Keep pruned weights at exactly zero inside a custom training loop.

    On entry the masks are applied (a no-op when they come from the model's own zeros) and gradient hooks are
    registered; with ``optimizer`` the zeros are also re-applied after each ``optimizer.step()`` and the
    optimizer's state is masked. On exit the zeros are applied once more and the hooks are removed.

    Args:
        model: the pruned model (plain, or wrapped by DDP / accelerate / PEFT).
        masks: ``{parameter name: bool tensor}`` (``True`` = kept); default: from the model's exact zeros.
        optimizer: the optimizer of the loop (recommended; needed for optimizers whose update can move a weight
            with zero gradient and zero state, and for a resumed optimizer).
        min_sparsity: with ``masks=None``, only weights with more exact zeros than this get a mask.

    Yields:
        The :class:`SparsityGuard` (``num_violations()``, ``masks``, ``apply_()``, ...).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> apply_masks_(model, {"0.weight": torch.eye(4, dtype=torch.bool)})
        12
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> with keep_sparse(model, optimizer=optimizer) as guard:
        ...     for _ in range(3):
        ...         model(torch.randn(2, 4)).pow(2).sum().backward()
        ...         optimizer.step()
        ...         optimizer.zero_grad()
        >>> guard.num_violations(), int((model[0].weight != 0).sum())
        (0, 4)
    """
    guard = SparsityGuard(model, masks, min_sparsity=min_sparsity)
    changed = guard.apply_()
    if changed:
        logger.info("keep_sparse: zeroed %d pruned weights on entry", changed)
    with guard.attached(optimizer):
        yield guard
