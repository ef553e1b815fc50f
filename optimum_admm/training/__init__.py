"""Fine-tune a pruned model without refilling its pruned weights.

- :class:`SparsityPreservingCallback`: one line in a ``transformers.Trainer`` script;
- :func:`keep_sparse` / :func:`apply_masks_` / :class:`SparsityGuard`: the same for a custom PyTorch loop;
- :func:`merge_lora_sparse`: merge LoRA adapters into a pruned model and keep it sparse (needs ``peft``).

Masks are ``{parameter name: bool tensor}``, ``True`` where a weight is kept; by default they come from the model's
exact zeros (:func:`masks_from_model`).

Example:
    >>> from optimum_admm.training import SparsityPreservingCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=data,  # doctest: +SKIP
    ...                   callbacks=[SparsityPreservingCallback()])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .masking import Masks, SparsityGuard, apply_masks_, canonical_name, keep_sparse, masks_from_model

if TYPE_CHECKING:
    from .callback import SparsityPreservingCallback
    from .lora import lora_merge_fill, merge_lora_sparse

__all__ = [
    "Masks",
    "SparsityGuard",
    "SparsityPreservingCallback",
    "apply_masks_",
    "canonical_name",
    "keep_sparse",
    "lora_merge_fill",
    "masks_from_model",
    "merge_lora_sparse",
]

_LAZY = {
    "SparsityPreservingCallback": ".callback",  # imports transformers' Trainer machinery
    "lora_merge_fill": ".lora",
    "merge_lora_sparse": ".lora",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
