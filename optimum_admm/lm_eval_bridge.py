"""Zero-shot evaluation through EleutherAI's lm-evaluation-harness, on a model already in memory.

``lm-eval`` is optional (``pip install ".[eval]"`` from the clone, or ``pip install 'lm-eval>=0.4.5,<0.5'``) and imported only when called. The model is wrapped with
``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)``, so a pruned model is evaluated as it is,
without saving and reloading it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["evaluate_tasks"]


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    limit: int | float | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on an in-memory model and return ``{task: {metric: value}}``.

    Args:
        model: a ``PreTrainedModel`` (pruned or not), on its own device.
        tokenizer: its tokenizer.
        tasks: lm-eval task names (``["piqa", "arc_easy"]``) or names of tasks defined under ``include_path``.
        include_path: a folder of extra task YAML files (local tasks and datasets work offline).
        include_defaults: also index lm-eval's built-in tasks (slow to index; turn off for local tasks only).
        num_fewshot: few-shot examples (default: the task's).
        batch_size: evaluation batch size.
        limit: evaluate only this many (or this fraction of) examples per task.
        seed: seed for lm-eval's random, numpy and torch generators.

    Raises:
        ValueError: for an empty task list or a missing ``include_path``.
        ImportError: when lm-eval is not installed, with the install command.

    Example:
        >>> scores = evaluate_tasks(pruner.model, pruner.tokenizer, ["arc_easy"], limit=100)  # doctest: +SKIP
        >>> scores["arc_easy"]["acc,none"]  # doctest: +SKIP
        0.61
    """
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks={tasks!r} is invalid; allowed: a non-empty list of lm-eval task names")
    if include_path is not None and not os.path.isdir(include_path):
        raise ValueError(f"include_path={str(include_path)!r} is not a directory of task YAML files")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:  # pragma: no cover - exercised only without lm-eval
        raise ImportError("evaluate_tasks needs lm-eval: pip install 'lm-eval>=0.4.5,<0.5'") from err

    from .stores import input_device

    device = str(input_device(model))  # never `meta`, even when the first module is offloaded
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(
        include_path=str(include_path) if include_path is not None else None, include_defaults=include_defaults
    )
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        log_samples=False,
    )
    return {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, metrics in output["results"].items()
    }
