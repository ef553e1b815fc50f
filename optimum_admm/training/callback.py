"""``SparsityPreservingCallback``: keep a pruned model sparse inside an existing ``transformers.Trainer`` script.

Where it acts in the ``Trainer`` loop (transformers 4.56 - 5.x):

- ``on_train_begin`` (the model is on its device, the optimizer exists, a checkpoint's optimizer state is loaded):
  bind the masks to the parameters, zero any pruned entry that is not zero yet, register one gradient hook per
  masked parameter and zero the pruned entries of the optimizer state;
- every backward pass (each micro-batch of gradient accumulation, the recomputation of gradient checkpointing, under
  autocast): the hooks zero the pruned entries of each gradient before it reaches ``.grad``, so clipping, DDP's
  all-reduce and the optimizer see masked gradients;
- ``on_pre_optimizer_step``: on the first step, check that the hooks ran (no pruned entry of ``.grad`` is non-zero);
  if an engine bypassed them, warn and zero the pruned entries of ``.grad`` before every step from then on;
- ``on_optimizer_step``: write the zeros into the weights again;
- ``on_train_end``: check that no pruned weight moved, remove the hooks, and warn when PEFT adapters are attached
  whose plain ``merge_and_unload()`` would fill pruned weights (use :func:`merge_lora_sparse`).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .masking import Masks, SparsityGuard, _check_min_sparsity

__all__ = ["SparsityPreservingCallback"]

logger = logging.getLogger(__name__)


class SparsityPreservingCallback(TrainerCallback):
    """Keep the pruned weights of the model a ``Trainer`` trains at exactly zero.

    Args:
        masks: ``{parameter name: bool tensor}`` (``True`` = kept). Default: taken from the model's exact zeros when
            training starts (and reused if ``train()`` is called again).
        min_sparsity: with ``masks=None``, only weights whose fraction of exact zeros is above this get a mask.

    Example:
        >>> from transformers import Trainer, TrainingArguments
        >>> from optimum_admm.training import SparsityPreservingCallback
        >>> trainer = Trainer(model=pruned_model, args=TrainingArguments("out"), train_dataset=train_dataset,  # doctest: +SKIP
        ...                   callbacks=[SparsityPreservingCallback()])
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, masks: Masks | None = None, *, min_sparsity: float = 0.0) -> None:
        _check_min_sparsity(min_sparsity)
        if masks is not None and not hasattr(masks, "keys"):
            raise ValueError(
                f"masks of type {type(masks).__name__} is invalid; allowed: None or a dict of name -> bool tensor "
                "(for a saved directory use SparsityPreservingCallback.from_saved(path))"
            )
        self._masks = masks
        self.min_sparsity = min_sparsity
        self.guard: SparsityGuard | None = None
        self._mask_grads: bool | None = None

    @classmethod
    def from_saved(
        cls, directory: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
    ) -> SparsityPreservingCallback:
        """A callback holding the masks saved with a pruned model (``masks.safetensors``, from ``save_masks=True``),
        from a local directory or a Hub repo id.

        Raises:
            ImportError: this version of optimum-admm cannot read saved masks (no ``optimum_admm.export.load_masks``).

        Example:
            >>> callback = SparsityPreservingCallback.from_saved("smollm2-admm-70")  # doctest: +SKIP
        """
        from .. import export

        load_masks = getattr(export, "load_masks", None)
        if load_masks is None:
            raise ImportError(
                "optimum_admm.export.load_masks is not available in this version; use SparsityPreservingCallback() "
                "to take the masks from the model's exact zeros"
            )
        return cls(masks=load_masks(directory, revision=revision, token=token))

    @property
    def masks(self) -> Masks | None:
        """The masks in use (``None`` until training starts when they come from the model's zeros)."""
        return self.guard.masks if self.guard is not None else self._masks

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if model is None:
            raise ValueError("model=None is invalid: SparsityPreservingCallback needs the Trainer's model")
        if self.guard is not None:
            self.guard.detach()
        self.guard = SparsityGuard(model, self._masks, min_sparsity=self.min_sparsity)
        self._mask_grads = None
        self._masks = self.guard.masks  # a later train() keeps the same pattern
        changed = self.guard.apply_()
        self.guard.attach()
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            self.guard.mask_optimizer_state_(optimizer)
        logger.info(
            "keeping %d pruned weights of %d parameters at zero%s",
            self.guard.num_pruned,
            len(self._masks),
            f" ({changed} zeroed now)" if changed else "",
        )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.guard is None:
            return
        if self._mask_grads is None:  # first step: did the gradient hooks run?
            self._mask_grads = self.guard.num_gradient_violations() > 0
            if self._mask_grads:
                logger.warning("gradient hooks were bypassed (sharded engine?); masking .grad before every step")
        if self._mask_grads:
            self.guard.mask_gradients_()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.guard is not None:
            self.guard.apply_(count=False)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if self.guard is None:
            return
        self.guard.detach()
        violations = self.guard.num_violations()
        if violations:  # pragma: no cover - the hooks and the re-application make this unreachable
            warnings.warn(f"{violations} pruned weights are non-zero after training; zeroing them", stacklevel=2)
            self.guard.apply_()
        logger.info("training ended with all %d pruned weights at zero", self.guard.num_pruned)
        if model is not None and hasattr(model, "merge_and_unload"):
            from .lora import lora_merge_fill

            filled = lora_merge_fill(model, self.guard.masks)
            if filled:
                warnings.warn(
                    f"merging these adapters with merge_and_unload() would fill {filled} pruned weights; merge with "
                    "optimum_admm.training.merge_lora_sparse(model) to keep the sparsity",
                    stacklevel=2,
                )
