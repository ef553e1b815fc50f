"""Dynamic batch loading (Sheared LLaMA, Xia et al. 2023, https://arxiv.org/abs/2310.06694, Section 2.2).

Train on data from several domains and, after every evaluation on per-domain validation sets, move the sampling
weights toward the domains whose loss is furthest above a reference loss:

    paper rule:           d = max(l - l_ref, 0);   w <- w * exp(eta * d);   w <- w / sum(w)
    reference-code rule:  d = l - l_ref;           w <- softmax(log w + eta * d);   w <- (1 - c) w + c / k

(maths in :mod:`optimum_admm.structured.dbl_rules`, data in :mod:`optimum_admm.structured.dbl_dataset`). This
module holds the recipe (:class:`DynamicBatchLoadingConfig`) and the ``transformers.Trainer`` integration
(:class:`DynamicBatchLoadingCallback`): it reads ``eval_<domain>_loss`` after each evaluation of
``eval_dataset={domain: dataset}``, updates the shared weights of a :class:`MultiDomainDataset` (seen by every
data-loader worker), logs the weight trajectory, and saves/restores the data state with Trainer checkpoints.

Example:
    >>> from transformers import Trainer, TrainingArguments  # doctest: +SKIP
    >>> train = MultiDomainDataset({"code": code_ds, "books": book_ds}, sequence_length=1024,
    ...                            tokenizer=tokenizer)  # doctest: +SKIP
    >>> callback = DynamicBatchLoadingCallback(train, DynamicBatchLoadingConfig(
    ...     reference_losses={"code": 1.1, "books": 2.4}))  # doctest: +SKIP
    >>> args = TrainingArguments("out", max_steps=1000, eval_strategy="steps", eval_steps=100,
    ...                          ignore_data_skip=True)  # doctest: +SKIP
    >>> Trainer(model, args, train_dataset=train, eval_dataset={"code": code_val, "books": book_val},
    ...         data_collator=collate_packed, callbacks=[callback]).train()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..version import __version__
from .dbl_dataset import MultiDomainDataset, PackedSequences, collate_packed, tokenize_to_stream
from .dbl_rules import (
    UPDATE_RULES,
    ScalingLawFit,
    fit_scaling_law,
    normalize_weights,
    paper_update,
    reference_code_update,
    scaling_law_reference_losses,
    update_domain_weights,
)

logger = logging.getLogger(__name__)

FIRST_EVALUATION = "first_evaluation"

__all__ = [
    "FIRST_EVALUATION",
    "UPDATE_RULES",
    "DynamicBatchLoadingCallback",
    "DynamicBatchLoadingConfig",
    "MultiDomainDataset",
    "PackedSequences",
    "ScalingLawFit",
    "collate_packed",
    "domain_losses",
    "fit_scaling_law",
    "normalize_weights",
    "paper_update",
    "reference_code_update",
    "scaling_law_reference_losses",
    "tokenize_to_stream",
    "update_domain_weights",
]


@dataclass
class DynamicBatchLoadingConfig:
    """The recipe of dynamic batch loading.

    Example:
        >>> DynamicBatchLoadingConfig(reference_losses={"code": 1.1, "books": 2.4}).rule
        'paper'
        >>> DynamicBatchLoadingConfig(rule="constant").reference_losses is None
        True
    """

    rule: str = field(
        default="paper",
        metadata={"help": "'paper' (clipped, multiplicative), 'reference_code' (unclipped softmax) or 'constant'."},
    )
    reference_losses: dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": "Per-domain reference losses (a dict, e.g. the source model's losses or a scaling-law "
            "prediction), or 'first_evaluation' to take the first evaluation's losses (the model's own losses "
            "when training starts from the source and eval_on_start=True). Required unless rule='constant'."
        },
    )
    step_size: float = field(default=1.0, metadata={"help": "Step size eta multiplying the excess loss (> 0)."})
    smoothing: float = field(
        default=1e-4, metadata={"help": "Mix toward uniform c in [0, 1) of the 'reference_code' rule."}
    )
    metric_prefix: str = field(
        default="eval", metadata={"help": "Trainer metric prefix: losses are read from '<prefix>_<domain>_loss'."}
    )
    version: str = field(default=__version__, metadata={"help": "optimum-admm version that wrote the recipe."})

    def __post_init__(self) -> None:
        if self.rule not in UPDATE_RULES:
            raise ValueError(f"rule={self.rule!r} is invalid; allowed: {list(UPDATE_RULES)}")
        ref = self.reference_losses
        if ref is None and self.rule != "constant":
            raise ValueError(
                f"reference_losses=None is invalid with rule={self.rule!r}; give a dict or {FIRST_EVALUATION!r}"
            )
        if isinstance(ref, str) and ref != FIRST_EVALUATION:
            raise ValueError(f"reference_losses={ref!r} is invalid; allowed: a dict of floats or {FIRST_EVALUATION!r}")
        if isinstance(ref, Mapping):
            bad = {
                k: v
                for k, v in ref.items()
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            }
            if bad or not ref:
                raise ValueError(
                    f"reference_losses={dict(ref)!r} is invalid; allowed: a non-empty dict of finite floats"
                )
            self.reference_losses = {str(k): float(v) for k, v in ref.items()}
        elif ref is not None and not isinstance(ref, str):
            raise ValueError(f"reference_losses={ref!r} is invalid; allowed: a dict of floats or {FIRST_EVALUATION!r}")
        for name in ("step_size", "smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is invalid; allowed: a finite number")
        if not self.step_size > 0:
            raise ValueError(f"step_size={self.step_size!r} is invalid; allowed: a number > 0")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing={self.smoothing!r} is invalid; allowed: a number in [0, 1)")
        if not isinstance(self.metric_prefix, str) or not self.metric_prefix:
            raise ValueError(f"metric_prefix={self.metric_prefix!r} is invalid; allowed: a non-empty string")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DynamicBatchLoadingConfig:
        """Build from :meth:`to_dict` output; unknown keys (from a newer version) warn and are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"Ignoring unknown DynamicBatchLoadingConfig keys {unknown} (newer version?)", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


def domain_losses(
    model: Any, eval_datasets: Mapping[str, torch.utils.data.Dataset], batch_size: int = 8
) -> dict[str, float]:
    """Mean token loss of ``model`` on each domain's packed validation set (e.g. the source model's reference).

    Every sequence is scored the way ``Trainer`` scores it (labels = inputs, shifted inside the model); the
    domain's loss is the mean over its tokens.

    Args:
        model: A causal LM returning ``.loss`` when given ``labels``.
        eval_datasets: ``{domain: dataset of {"input_ids": ...}}``, e.g. :class:`PackedSequences`.
        batch_size: Sequences per forward pass.

    Returns:
        ``{domain: loss}``.

    Example:
        >>> reference = domain_losses(source_model, {"code": code_val, "books": book_val})  # doctest: +SKIP
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = {}
    try:
        with torch.no_grad():
            for name, dataset in eval_datasets.items():
                loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_packed)
                total, count = 0.0, 0
                for batch in loader:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    tokens = batch["input_ids"].numel() - batch["input_ids"].shape[0]
                    total += float(model(**batch, use_cache=False).loss) * tokens
                    count += tokens
                losses[name] = total / count
    finally:
        model.train(was_training)
    return losses


class DynamicBatchLoadingCallback(TrainerCallback, ExportableState):
    """Update a :class:`MultiDomainDataset`'s weights after each per-domain evaluation; checkpoint its state.

    Needs ``eval_dataset={domain: dataset}`` with one entry per domain of the training data (extra entries are
    ignored), ``TrainingArguments(ignore_data_skip=True)`` (the callback restores the exact data position itself;
    the Trainer's own fast-forward would skip those batches a second time) and the default
    ``restore_callback_states_from_checkpoint=False``. The state (weights, draw counters, cursors, trajectory)
    is stored in ``trainer_state.json`` of every checkpoint and restored by ``train(resume_from_checkpoint=...)``.
    ``dataloader_in_order=True`` (the default). Several processes (``torchrun``, DDP): every rank updates with the
    same gathered metrics and takes rank 0's weights, so the mixture is identical everywhere; each rank trains on
    its part of every global batch drawn from it; a checkpoint records the stream position of the whole global
    batch, so a resume is exact with any number of processes that keeps the global batch (``tests/shear_worker.py``).

    Attributes:
        trajectory: One entry per update: ``{"step", "losses", "reference_losses", "gaps", "weights"}``; the
            first entry (step of the first ``on_train_begin``) holds the initial weights only.

    Example:
        >>> data = MultiDomainDataset({"a": list(range(64)), "b": list(range(64))}, sequence_length=8)
        >>> callback = DynamicBatchLoadingCallback(data, DynamicBatchLoadingConfig(reference_losses={"a": 2.0,
        ...                                                                                        "b": 3.0}))
        >>> {k: round(v, 6) for k, v in callback.update({"a": 2.5, "b": 3.0}, step=10).items()}
        {'a': 0.622459, 'b': 0.377541}
    """

    def __init__(self, dataset: MultiDomainDataset, config: DynamicBatchLoadingConfig | None = None) -> None:
        if not isinstance(dataset, MultiDomainDataset):
            raise ValueError(f"dataset must be a MultiDomainDataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.config = config if config is not None else DynamicBatchLoadingConfig(rule="constant")
        ref = self.config.reference_losses
        if isinstance(ref, Mapping) and set(ref) != set(dataset.domain_names):
            raise ValueError(
                f"reference_losses names {sorted(ref)}, the dataset's domains are {list(dataset.domain_names)}"
            )
        self.reference_losses: dict[str, float] | None = dict(ref) if isinstance(ref, Mapping) else None
        self.trajectory: list[dict[str, Any]] = []
        self._pending: dict[str, float] = {}
        self._args: Any = None
        self._state: Any = None
        self._start_step = 0

    # ------------------------------------------------------------------ maths driver
    def update(self, losses: Mapping[str, float], step: int) -> dict[str, float]:
        """Apply the configured rule to the dataset's weights given per-domain ``losses``; record and return them."""
        names = self.dataset.domain_names
        if self.reference_losses is None and self.config.reference_losses == FIRST_EVALUATION:
            self.reference_losses = {name: float(losses[name]) for name in names}
            logger.info("Dynamic batch loading: reference losses from the first evaluation: %s", self.reference_losses)
        reference = self.reference_losses
        loss_vector = [float(losses[name]) for name in names]
        old = [self.dataset.weights[name] for name in names]
        if self.config.rule == "constant":
            new = normalize_weights(old)
        else:
            ref_vector = [reference[name] for name in names]
            new = update_domain_weights(
                old, loss_vector, ref_vector, self.config.rule, self.config.step_size, self.config.smoothing
            )
        new = self._agree(new)
        self.dataset.set_weights(new)
        weights = dict(zip(names, new.tolist(), strict=True))
        gaps = None if reference is None else {n: float(losses[n]) - reference[n] for n in names}
        self.trajectory.append(
            {
                "step": int(step),
                "losses": dict(zip(names, loss_vector, strict=True)),
                "reference_losses": None if reference is None else dict(reference),
                "gaps": gaps,
                "weights": weights,
            }
        )
        logger.info(
            "Dynamic batch loading at step %d (%s rule): weights %s",
            step,
            self.config.rule,
            ", ".join(f"{n}={w:.4f}" for n, w in weights.items()),
        )
        return weights

    @staticmethod
    def _agree(weights: torch.Tensor) -> torch.Tensor:
        """Rank 0's new weights on every process (the Trainer's gathered metrics already agree; this makes the
        mixture's single source of truth explicit). One process: unchanged."""
        from ..distributed import current

        group = current()
        if group.enabled:
            weights = weights.clone().to(torch.float64)
            group.broadcast_(weights, src=0)
        return weights

    # ------------------------------------------------------------------ Trainer events
    def _check_args(self, args: Any) -> None:
        if not args.ignore_data_skip:
            raise ValueError(
                "DynamicBatchLoadingCallback restores the exact data position itself: set "
                "TrainingArguments(ignore_data_skip=True), or resuming would skip the consumed batches twice"
            )
        if getattr(args, "restore_callback_states_from_checkpoint", False):
            raise ValueError(
                "restore_callback_states_from_checkpoint=True would rebuild DynamicBatchLoadingCallback without its "
                "dataset; leave it False (the callback restores its own state)"
            )
        if not getattr(args, "dataloader_in_order", True):
            raise ValueError("dataloader_in_order=False breaks the exact data position; leave it True")

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check_args(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check_args(args)
        self._args, self._state, self._start_step = args, state, state.global_step
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        attributes = saved.get("attributes", {}) if isinstance(saved, Mapping) else {}
        if state.global_step > 0 and "data_state" in attributes:
            self.dataset.load_state_dict(attributes["data_state"])
            self.trajectory = list(attributes.get("trajectory", []))
            if attributes.get("reference_losses") is not None:
                self.reference_losses = dict(attributes["reference_losses"])
            logger.info("Dynamic batch loading: restored the data state of step %d", state.global_step)
        if not self.trajectory:
            self.trajectory.append({"step": int(state.global_step), "weights": self.dataset.weights})
        self._pending = {}

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Mapping[str, float] | None = None, **kwargs: Any
    ) -> None:
        prefix = self.config.metric_prefix
        for name in self.dataset.domain_names:
            key = f"{prefix}_{name}_loss"
            if metrics and key in metrics:
                self._pending[name] = float(metrics[key])
        if len(self._pending) == len(self.dataset.domain_names):
            weights = self.update(self._pending, state.global_step)
            self._pending = {}
            state.log_history.append({**{f"dbl_weight_{n}": w for n, w in weights.items()}, "step": state.global_step})

    def state(self) -> dict[str, Any]:
        """What ``Trainer`` writes into ``trainer_state.json`` at each checkpoint (JSON only)."""
        if self._args is not None and self._state is not None:
            # Every optimiser step takes gradient_accumulation_steps batches per process from the one sample stream
            # (accelerate hands rank r its part of each global batch, whether rank 0 dispatches the batches or every
            # rank reads the stream and keeps its shard), so the stream has advanced by this many batches:
            consumed = (
                (self._state.global_step - self._start_step)
                * self._args.gradient_accumulation_steps
                * max(1, self._args.world_size)
            )
            data_state = self.dataset.state_dict(consumed, self._args.per_device_train_batch_size)
        else:
            data_state = self.dataset.state_dict()
        return {
            "args": {},
            "attributes": {
                "data_state": data_state,
                "trajectory": self.trajectory,
                "reference_losses": self.reference_losses,
                "config": self.config.to_dict(),
            },
        }
