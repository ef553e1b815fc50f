"""LoRA on a pruned model, and a merge that keeps its sparsity.

Training LoRA adapters on a pruned model leaves the frozen base weights sparse, but the merged update
``W + s·B·A`` is dense: PEFT's ``merge_and_unload()`` fills every pruned weight. :func:`merge_lora_sparse` merges
``W + (s·B·A) ⊙ M`` instead (``M`` the mask), which is the same as merging and re-applying the mask because
``W ⊙ M = W``. The part of the update that falls on pruned weights is dropped, so the merged model differs slightly
from base + adapters; how much is logged (the fraction of the update's squared norm that was dropped).

Needs ``peft`` (``pip install peft``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .masking import Masks, apply_masks_, bind_masks, canonical_name, masks_from_model

__all__ = ["lora_merge_fill", "merge_lora_sparse"]

logger = logging.getLogger(__name__)


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _delta_stats(model: nn.Module, masks: Masks, adapter_names: Sequence[str] | None) -> tuple[int, float, float]:
    """``(pruned entries the merge fills, squared norm of the update on pruned entries, total squared norm)``."""
    pruned_by_name = {name: pruned for name, _, pruned in bind_masks(model, masks)}
    filled, dropped, total = 0, 0.0, 0.0
    with torch.no_grad():
        for name, layer in _lora_layers(model):
            names = [a for a in (adapter_names or layer.active_adapters) if a in layer.lora_A]
            if not names:
                continue
            delta = sum(layer.get_delta_weight(a).float() for a in names)
            total += float(delta.pow(2).sum())
            pruned = pruned_by_name.get(canonical_name(f"{name}.weight"))
            if pruned is not None:
                on_pruned = delta[pruned.to(delta.device)]
                filled += int((on_pruned != 0).sum())
                dropped += float(on_pruned.pow(2).sum())
    return filled, dropped, total


def _check_peft_model(model: Any) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "merge_and_unload"):
        raise ValueError(
            f"model of type {type(model).__name__} is invalid; allowed: a PEFT model with LoRA adapters "
            "(peft.get_peft_model(...))"
        )


def lora_merge_fill(model: nn.Module, masks: Masks | None = None) -> int:
    """How many pruned weights a plain ``merge_and_unload()`` of the active LoRA adapters would make non-zero.

    Args:
        model: a PEFT model with LoRA adapters.
        masks: ``{parameter name: bool tensor}`` (``True`` = kept); default: the base weights' exact zeros.

    Example:
        >>> lora_merge_fill(peft_model)  # doctest: +SKIP
        41472
    """
    _check_peft_model(model)
    masks = masks_from_model(model) if masks is None else masks
    return _delta_stats(model, masks, None)[0]


def merge_lora_sparse(
    model: nn.Module,
    masks: Masks | None = None,
    *,
    keep_sparsity: bool = True,
    adapter_names: Sequence[str] | None = None,
    safe_merge: bool = False,
) -> nn.Module:
    """Merge LoRA adapters into a pruned base model and unload PEFT, keeping the base model's zero pattern.

    Args:
        model: a PEFT model with LoRA adapters on a pruned base model.
        masks: ``{parameter name: bool tensor}`` (``True`` = kept); default: the base weights' exact zeros
            (read before merging).
        keep_sparsity: mask the merged update (default). ``False`` merges as PEFT does and warns how many
            pruned weights it filled.
        adapter_names: adapters to merge (default: the active ones), as in ``merge_and_unload``.
        safe_merge: check the merged weights for NaN before writing them, as in ``merge_and_unload``.

    Returns:
        The base model with the adapters merged in.

    Raises:
        ValueError: ``model`` is not a PEFT model, or ``masks`` do not fit it.

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> peft_model = get_peft_model(pruned_model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
        >>> # ... train peft_model (with SparsityPreservingCallback if other weights train too) ...
        >>> merged = merge_lora_sparse(peft_model)  # doctest: +SKIP
    """
    _check_peft_model(model)
    if not isinstance(keep_sparsity, bool):
        raise ValueError(f"keep_sparsity={keep_sparsity!r} is invalid; allowed: True or False")
    masks = masks_from_model(model) if masks is None else dict(masks)
    filled, dropped, total = _delta_stats(model, masks, adapter_names)
    if keep_sparsity and any(
        getattr(layer, "use_dora", {}).get(a) for _, layer in _lora_layers(model) for a in layer.lora_A
    ):
        warnings.warn(
            "DoRA adapters rescale whole weight columns; masking their merged update is an approximation",
            stacklevel=2,
        )
    merged = model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
    if keep_sparsity:
        zeroed = apply_masks_(merged, masks)
        logger.info(
            "merged LoRA keeping sparsity: %d pruned weights kept at zero, %.2f%% of the update's squared norm dropped",
            zeroed,
            100.0 * dropped / total if total else 0.0,
        )
    elif filled:
        warnings.warn(
            f"the merge filled {filled} pruned weights ({filled / max(1, _count_pruned(masks)):.1%} of them); "
            "pass keep_sparsity=True to keep the model sparse",
            stacklevel=2,
        )
    return merged


def _count_pruned(masks: Masks) -> int:
    return sum(int((~m.bool()).sum()) for m in masks.values())
