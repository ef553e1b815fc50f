"""Sheared-LLaMA inside ``transformers.Trainer``: a subclass and a callback (no maths here).

:class:`ShearingTrainer` attaches a :class:`~optimum_admm.structured.gating.ShearingModule` to the model and trains
one AdamW with three parameter groups: the model weights (``args.learning_rate``), the gate logits
(``gate_learning_rate``, no weight decay) and the Lagrange multipliers (``lambda_learning_rate``, ascent through
their gradient-negating hooks). The logs carry the expected shape vs the target, the multipliers and how binary the
gates are (keys ``shear/...``). The gates are saved beside every checkpoint (``shearing_state.safetensors``).

Several processes (``torchrun``, ``accelerate launch``; DDP): the gates and multipliers start from rank 0's values,
their gradients are averaged over the processes before every optimiser step (as DDP averages the weights'), and the
Lagrangian's gradient is added once per step, outside the loss the Trainer rescales
(:meth:`~optimum_admm.structured.gating.ShearingModule.finish_gradients`). So the update of one global batch is
the same however it is split over gradient accumulation and processes, and every rank holds the same gates.
Each rank draws its own hard-concrete sample from its RNG, like dropout. FSDP is refused at the start of training:
the gates live outside the wrapped model and their synchronisation is built and tested for DDP only.

:class:`ShearingCallback` gives the same training to any existing ``Trainer`` (when subclassing is not possible): it
attaches the gates, keeps the warm-up in step, steps its own AdamW for gates and multipliers right after the
Trainer's optimiser step, and adds the ``shear/...`` metrics to the logs.

Example:
    >>> from transformers import TrainingArguments
    >>> from optimum_admm.structured import ShearingConfig
    >>> from optimum_admm.structured.training import ShearingTrainer
    >>> trainer = ShearingTrainer(model=model, args=TrainingArguments("out", max_steps=100),
    ...     shearing_config=ShearingConfig(num_hidden_layers=12), train_dataset=data)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .configuration import ShearingConfig
from .gating import STATE_FILE, ShearingModule

logger = logging.getLogger(__name__)

__all__ = ["ShearingCallback", "ShearingTrainer", "shearing_param_groups"]


def shearing_param_groups(shearing: ShearingModule) -> list[dict[str, Any]]:
    """The gate-logit and multiplier parameter groups (no weight decay), with the config's learning rates."""
    return [
        {"params": list(shearing.gates.parameters()), "lr": shearing.config.gate_learning_rate, "weight_decay": 0.0},
        {
            "params": list(shearing.lagrangian.parameters()),
            "lr": shearing.config.lambda_learning_rate,
            "weight_decay": 0.0,
        },
    ]


class ShearingCallback(TrainerCallback):
    """Sheared-LLaMA for an existing Trainer: gates attached, warm-up tracked, shape metrics logged.

    Args:
        shearing: The gates and multipliers (attached to the model at the start of training if not yet).
        own_optimizer: Step a separate AdamW for the gates and multipliers after each Trainer optimiser step.
            :class:`ShearingTrainer` puts them in its own optimiser instead and passes ``False``.

    Example:
        >>> shearing = ShearingModule.from_model(model, ShearingConfig(num_hidden_layers=12))  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=data,
        ...     callbacks=[ShearingCallback(shearing)])  # doctest: +SKIP
    """

    def __init__(self, shearing: ShearingModule, own_optimizer: bool = True) -> None:
        self.shearing = shearing
        self.own_optimizer = own_optimizer
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "fsdp", None):
            raise ValueError(
                f"fsdp={args.fsdp!r} is not supported by Sheared-LLaMA training: its gate synchronisation is built and "
                "tested for DDP (the default under torchrun); leave fsdp unset"
            )
        if model is not None:
            self.shearing.to(next(model.parameters()).device)
            if not self.shearing.attached:
                self.shearing.attach(model)
        # The Lagrangian is applied once per optimiser step (finish_gradients), not inside the loss the Trainer
        # rescales by gradient accumulation, processes and token counts.
        self.shearing.penalty_in_loss = False
        if state.global_step == 0:
            self.shearing.broadcast_from_rank_zero()
        if self.own_optimizer and self.optimizer is None:
            self.optimizer = torch.optim.AdamW(shearing_param_groups(self.shearing))
        self.shearing.set_progress(state.global_step, state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self.shearing.set_progress(state.global_step, state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.shearing.finish_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.optimizer is not None:
            self.optimizer.step()
        # The Trainer zeroes only the model's gradients: the gates and multipliers are not model parameters, and
        # without this their gradients would accumulate over all steps (and the multipliers would never turn).
        self.shearing.zero_grad(set_to_none=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.shearing.last_metrics:
            logs.update(self.shearing.last_metrics)
            self.history.append({"step": state.global_step, **self.shearing.last_metrics})


class ShearingTrainer(Trainer):
    """A ``transformers.Trainer`` that learns Sheared-LLaMA gates while training the model.

    Args:
        model: A LLaMA-like causal LM (LLaMA, Mistral, Qwen2, ...).
        args: ``TrainingArguments``; ``learning_rate`` is the weights' rate. Gradient checkpointing must be
            non-reentrant (the transformers default) so that the single gate draw is reused in recomputation.
        shearing_config: The target shape and gate constants (ignored when ``shearing`` is given).
        shearing: A ready :class:`ShearingModule` (for example, to resume from saved gates).
        **kwargs: Everything else ``Trainer`` accepts.

    Attributes:
        shearing: The gates and multipliers; pass it to
            :func:`~optimum_admm.structured.prune_to_shape.prune_to_shape` after training.

    Example:
        >>> trainer = ShearingTrainer(model=model, args=args, train_dataset=data,
        ...     shearing_config=ShearingConfig(num_hidden_layers=12))  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> trainer.shearing.expected_shape()["num_hidden_layers"]  # doctest: +SKIP
        12.03
    """

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        shearing_config: ShearingConfig | None = None,
        shearing: ShearingModule | None = None,
        **kwargs: Any,
    ) -> None:
        if shearing is None:
            if shearing_config is None:
                raise ValueError("ShearingTrainer needs shearing_config or shearing")
            shearing = ShearingModule.from_model(model, shearing_config)
        self.shearing = shearing
        if not shearing.attached:
            shearing.attach(model)
        self.shearing_callback = ShearingCallback(shearing, own_optimizer=False)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        super().__init__(model=model, args=args, callbacks=[*callbacks, self.shearing_callback], **kwargs)
        checkpointing_kwargs = getattr(self.args, "activation_checkpointing_kwargs", None)
        if checkpointing_kwargs is None:
            checkpointing_kwargs = getattr(self.args, "gradient_checkpointing_kwargs", None)
        if (checkpointing_kwargs or {}).get("use_reentrant", False):
            raise ValueError("ShearingTrainer needs non-reentrant gradient checkpointing (use_reentrant=False)")

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's weight groups plus the gate-logit and multiplier groups."""
        if self.optimizer is None:
            optimizer = super().create_optimizer(model)
            for group in shearing_param_groups(self.shearing):
                optimizer.add_param_group(group)
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the ``shear/...`` metrics (expected vs target shape, multipliers, binariness) to training logs."""
        if "loss" in logs and self.shearing.last_metrics:
            logs = {**logs, **self.shearing.last_metrics}
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        self.shearing.save(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """``train(resume_from_checkpoint=...)``: the weights as the Trainer loads them, then the gate logits and
        multipliers saved beside them (the optimiser state of all three groups is restored by the Trainer)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        directory = Path(resume_from_checkpoint)
        if not (directory / STATE_FILE).is_file():
            raise ValueError(
                f"resume_from_checkpoint={str(resume_from_checkpoint)!r} holds no {STATE_FILE}: it was not written by "
                "a ShearingTrainer, so the gates and multipliers cannot be restored"
            )
        self.shearing.load(directory)
        logger.info("restored the shearing gates and multipliers from %s", directory)
