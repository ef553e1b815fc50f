"""One call from a model and a token dataset to a sheared, standard, smaller model (what the CLI calls).

Example:
    >>> from optimum_admm.structured import ShearingConfig
    >>> from optimum_admm.structured.api import pack_tokens, shear
    >>> data = pack_tokens(texts, tokenizer, sequence_length=128)  # doctest: +SKIP
    >>> result = shear(model, ShearingConfig(num_hidden_layers=12), data, max_steps=200,
    ...     output_dir="sheared")  # doctest: +SKIP
    >>> result.model.config.num_hidden_layers  # doctest: +SKIP
    12
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .configuration import ShearingConfig
from .prune_to_shape import prune_to_shape

logger = logging.getLogger(__name__)

__all__ = ["ShearingResult", "pack_tokens", "shear"]


@dataclass
class ShearingResult:
    """What :func:`shear` returns.

    Attributes:
        model: The sliced model with the target config.
        shearing: The trained gates and multipliers.
        history: The ``shear/...`` metrics logged during training, one dict per logging step.

    Example:
        >>> ShearingResult(model=None, shearing=None).history
        []
    """

    model: Any
    shearing: Any
    history: list[dict[str, float]] = field(default_factory=list)


def pack_tokens(texts: Iterable[str], tokenizer: Any, sequence_length: int, max_sequences: int | None = None) -> Any:
    """Tokenise ``texts``, join them with EOS and cut the stream into ``sequence_length`` training sequences.

    Returns:
        A ``datasets.Dataset`` with ``input_ids`` and ``labels`` columns (labels = inputs; the model shifts them).

    Example:
        >>> data = pack_tokens(["some text", "more text"], tokenizer, sequence_length=4)  # doctest: +SKIP
    """
    from datasets import Dataset

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
        if max_sequences is not None and len(stream) >= max_sequences * sequence_length:
            break
    count = len(stream) // sequence_length
    if max_sequences is not None:
        count = min(count, max_sequences)
    if count == 0:
        raise ValueError(f"the texts hold fewer than sequence_length={sequence_length} tokens")
    rows = [stream[i * sequence_length : (i + 1) * sequence_length] for i in range(count)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def shear(
    model: nn.Module | str,
    config: ShearingConfig,
    train_dataset: Any,
    *,
    max_steps: int,
    output_dir: str | Path | None = None,
    learning_rate: float = 1e-4,
    per_device_train_batch_size: int = 8,
    **training_kwargs: Any,
) -> ShearingResult:
    """Learn the gates with :class:`~optimum_admm.structured.training.ShearingTrainer`, then prune to the target.

    Args:
        model: A LLaMA-like causal LM or a path / hub id for ``AutoModelForCausalLM.from_pretrained``.
        config: The target shape and gate constants.
        train_dataset: Token sequences (``input_ids`` and ``labels``), e.g. from :func:`pack_tokens`.
        max_steps: Optimiser steps of the pruning phase.
        output_dir: Where the pruned model (``save_pretrained``), ``shearing_config.json`` and the gates are written;
            ``None`` keeps everything in memory (the Trainer then writes nothing).
        learning_rate: Learning rate of the model weights.
        per_device_train_batch_size: Sequences per step.
        **training_kwargs: Any other ``TrainingArguments`` field (``gradient_accumulation_steps``, ``logging_steps``...).

    Returns:
        The sliced model (standard config with the target values), the gates and the logged shape history.

    Example:
        >>> config = ShearingConfig(num_hidden_layers=24, hidden_size=384, num_attention_heads=6,
        ...     num_key_value_heads=2, intermediate_size=1024)  # doctest: +SKIP
        >>> data = pack_tokens(texts, tokenizer, sequence_length=512)  # doctest: +SKIP
        >>> result = shear(model, config, data, max_steps=3200, output_dir="sheared")  # doctest: +SKIP
        >>> result.model.config.num_hidden_layers  # doctest: +SKIP
        24
    """
    from transformers import AutoModelForCausalLM, TrainingArguments

    from .training import ShearingTrainer

    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, use_safetensors=True)
    plan = config.plan(model.config)
    if plan.target == plan.source:  # as the CLI: training gates toward the source shape prunes nothing
        raise InvalidArgumentError(f"config: the target equals the source shape {plan.source}; nothing to prune")
    defaults = {"logging_steps": 10, "save_strategy": "no", "report_to": [], "max_grad_norm": 1.0}
    scratch = tempfile.TemporaryDirectory(prefix="shearing-") if output_dir is None else None
    args = TrainingArguments(  # the Trainer wants a directory: a temporary one when nothing is to be kept
        output_dir=str(output_dir) if scratch is None else scratch.name,
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=per_device_train_batch_size,
        **{**defaults, **training_kwargs},
    )
    trainer = ShearingTrainer(model=model, args=args, shearing_config=config, train_dataset=train_dataset)
    try:
        trainer.train()
    finally:
        if scratch is not None:
            scratch.cleanup()
    shearing = trainer.shearing
    shearing.detach()
    logger.info("Expected shape after %d steps: %s", max_steps, shearing.expected_shape())
    small = prune_to_shape(model, shearing)
    if output_dir is not None:
        small.save_pretrained(output_dir)
        shearing.save(output_dir)
    return ShearingResult(model=small, shearing=shearing, history=list(trainer.shearing_callback.history))
