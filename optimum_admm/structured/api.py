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
import os
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
        source_parameters: Parameters of the source model (tied tensors once).
        steps: Optimiser steps of the pruning phase.
        tokens_seen: Training tokens over all processes.
        source: The source's name or path (recorded in the lineage).
        use_cache: The source config's ``use_cache`` (restored in the saved config; training turns it off).

    Example:
        >>> ShearingResult(model=None, shearing=None).history
        []
    """

    model: Any
    shearing: Any
    history: list[dict[str, float]] = field(default_factory=list)
    source_parameters: int | None = None
    steps: int | None = None
    tokens_seen: int | None = None
    source: str | None = None
    use_cache: bool | None = True

    def metadata(self, evaluation_results: dict[str, Any] | None = None) -> dict[str, Any]:
        """The sidecar (``pruning_config.json``) content of this result."""
        from .export import shearing_metadata

        return shearing_metadata(
            self.shearing,
            source_parameters=self.source_parameters,
            parameters=_count_parameters(self.model),
            steps=self.steps,
            tokens_seen=self.tokens_seen,
            history=self.history,
            evaluation_results=evaluation_results,
            source=self.source,
        )

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        tokenizer: Any = None,
        overwrite: bool = False,
        evaluation_results: dict[str, Any] | None = None,
        model_card: bool = True,
        base_model: str | None = None,
        license: str | None = None,
        max_shard_size: int | str = "5GB",
        push_to_hub: bool = False,
        repo_id: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ) -> Path:
        """Save the sheared model with its sidecar, recipe, gates and card (staged: nothing half-written is left),
        and with ``push_to_hub=True`` push it to ``repo_id`` in one commit.

        Example:
            >>> result.save_pretrained("sheared", tokenizer=tokenizer, evaluation_results={"wikitext2": 31.2},
            ...     push_to_hub=True, repo_id="me/smollm2-sheared")  # doctest: +SKIP
        """
        from ..export import check_save_dir, normalize_evaluation_results
        from ..files import staged_directory
        from ..hub import check_push_arguments, push_folder_to_hub, require_token
        from .export import write_sheared

        if push_to_hub:
            if repo_id is None:
                raise InvalidArgumentError("push_to_hub=True needs repo_id='namespace/name'")
            check_push_arguments(repo_id, private, token, revision, commit_message)
            require_token(token)
        normalize_evaluation_results(evaluation_results)  # a bad value fails before anything is written
        target = check_save_dir(save_directory, overwrite).resolve()
        metadata = self.metadata(evaluation_results)
        with staged_directory(target) as staging:
            write_sheared(
                staging,
                self.model,
                self.shearing,
                metadata,
                tokenizer=tokenizer,
                use_cache=self.use_cache,
                model_card=model_card,
                base_model=base_model,
                license=license,
                repo_id=repo_id,
                location=str(save_directory),
                max_shard_size=max_shard_size,
            )
        if push_to_hub:
            push_folder_to_hub(
                target,
                repo_id,  # type: ignore[arg-type]
                private=private,
                token=token,
                revision=revision,
                commit_message=commit_message,  # default: named from the sidecar by the uploader
                create_pr=create_pr,
            )
        return target


def _count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once


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
        output_dir: The Trainer's output directory, where the sheared model is also written with its sidecar,
            recipe, gates and card (:func:`~optimum_admm.structured.export.write_sheared`; rank 0 only); ``None``
            keeps everything in memory (the Trainer then writes nothing): save with
            :meth:`ShearingResult.save_pretrained`.
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

    source = os.fspath(model) if isinstance(model, (str, Path)) else None
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, use_safetensors=True)
    source = source or getattr(model.config, "_name_or_path", None) or None
    try:
        config.plan(model.config)  # a target the model cannot reach (or equal to its shape) fails before training
    except ValueError as err:
        raise InvalidArgumentError(f"config: {err}") from None
    use_cache = getattr(model.config, "use_cache", True)
    source_parameters = _count_parameters(model)
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
    result = ShearingResult(
        model=small,
        shearing=shearing,
        history=list(trainer.shearing_callback.history),
        source_parameters=source_parameters,
        steps=trainer.state.global_step,
        tokens_seen=_tokens_seen(trainer, train_dataset),
        source=source,
        use_cache=use_cache,
    )
    if output_dir is not None and trainer.is_world_process_zero():
        from .export import write_sheared

        write_sheared(Path(output_dir), small, shearing, result.metadata(), use_cache=use_cache)
    return result


def _tokens_seen(trainer: Any, dataset: Any) -> int | None:
    """Optimiser steps x global batch x sequence length (``None`` when the sequence length is unknown)."""
    try:
        length = len(dataset[0]["input_ids"])
    except (TypeError, KeyError, IndexError):
        return None
    args = trainer.args
    return (
        trainer.state.global_step * args.train_batch_size * args.gradient_accumulation_steps * args.world_size * length
    )
