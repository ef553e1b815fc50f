"""Saving a pruned model: safetensors that plain transformers loads, the tokenizer, ``pruning_config.json``, a model
card and, optionally, the packed masks.

Storage stays dense: pruned weights are stored as ordinary safetensors in which the pruned entries are exact zeros.
No ``quantization_config`` or compressed-tensors ``sparsity_config`` is written into ``config.json``, so
``AutoModelForCausalLM.from_pretrained(save_dir)`` needs no extra code (and no loader can mistake the checkpoint for
a compressed one and load random weights).

Writes are atomic: everything goes to a temporary directory beside the target, which is renamed into place only
when complete, so an interrupted save never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .configuration import RECIPE_FILE, PruningConfig
from .errors import InvalidArgumentError
from .files import staged_directory
from .hub_files import saved_file
from .modeling import weight_name
from .reporting import PruningReport
from .version import __version__

__all__ = [
    "MASKS_NAME",
    "PRUNING_CONFIG_NAME",
    "check_save_dir",
    "load_masks",
    "load_pruning_config",
    "normalize_evaluation_results",
    "pruning_metadata",
    "read_pruning_metadata",
    "save_pruned",
    "saved_file",
    "staged_directory",
    "write_pruning_files",
]

logger = logging.getLogger(__name__)

PRUNING_CONFIG_NAME = RECIPE_FILE
MASKS_NAME = "masks.safetensors"
#: Version of the ``pruning_config.json`` layout (bumped when keys change meaning).
FORMAT_VERSION = 1
_MASK_FORMAT = "packbits-little-v1"


def check_save_dir(save_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any work, a ``save_dir`` that is a file or a non-empty directory (unless ``overwrite``).

    Example:
        >>> check_save_dir("/tmp/not-there-yet", overwrite=False).name
        'not-there-yet'
    """
    if not isinstance(save_dir, (str, os.PathLike)) or not str(save_dir):
        raise InvalidArgumentError(f"save_dir={save_dir!r} is invalid; allowed: a directory path")
    path = Path(save_dir)
    if path.exists() and not path.is_dir():
        raise InvalidArgumentError(f"save_dir={str(save_dir)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InvalidArgumentError(
            f"save_dir={str(save_dir)!r} is a non-empty directory; pass overwrite=True to replace it"
        )
    return path


def _check_max_shard_size(max_shard_size: int | str) -> int:
    from .memory import parse_size

    allowed = "a positive number of bytes or a size string such as '5GB', '500MB' or '2GiB'"
    return parse_size("max_shard_size", max_shard_size, max_shard_size, allowed)


def normalize_evaluation_results(results: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Bring evaluation results to ``{dataset: {"perplexity": float, ...}}``.

    Each value may be a number (the perplexity), a ``PerplexityResult``, a dict with a ``"perplexity"`` key (other
    keys such as ``"sequence_length"`` or ``"dense_perplexity"`` are kept), or an lm-eval task's metrics
    (``{"acc": 0.61, "acc_norm": 0.58}``, what :func:`optimum_admm.lm_eval_bridge.evaluate_tasks` returns per task).

    Example:
        >>> normalize_evaluation_results({"wikitext2": 14.5})
        {'wikitext2': {'perplexity': 14.5}}
    """
    if results is None:
        return {}
    allowed = (
        "a dict {dataset name: perplexity | PerplexityResult | {'perplexity': float, ...}} or {task: {metric: float}} "
        "(lm-eval results)"
    )
    if not isinstance(results, Mapping):
        raise InvalidArgumentError(
            f"evaluation_results of type {type(results).__name__} is invalid; allowed: {allowed}"
        )
    normalized: dict[str, dict[str, Any]] = {}
    for dataset, value in results.items():
        if hasattr(value, "to_dict") and not isinstance(value, Mapping):
            value = value.to_dict()
        entry = dict(value) if isinstance(value, Mapping) else {"perplexity": value}
        if not isinstance(dataset, str) or not dataset:
            raise InvalidArgumentError(f"evaluation_results[{dataset!r}]={value!r} is invalid; allowed: {allowed}")
        if "perplexity" not in entry and isinstance(value, Mapping):  # lm-eval metrics: {"acc": 0.61, ...}
            metrics = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if not metrics or not all(math.isfinite(float(v)) for v in metrics.values()):
                raise InvalidArgumentError(f"evaluation_results[{dataset!r}]={value!r} is invalid; allowed: {allowed}")
            normalized[dataset] = {k: float(v) for k, v in metrics.items()}
            continue
        ppl = entry.get("perplexity")
        if isinstance(ppl, bool) or not isinstance(ppl, (int, float)):
            raise InvalidArgumentError(f"evaluation_results[{dataset!r}]={value!r} is invalid; allowed: {allowed}")
        if not math.isfinite(float(ppl)) or float(ppl) <= 0:
            raise InvalidArgumentError(
                f"evaluation_results[{dataset!r}] perplexity={ppl!r} is invalid; allowed: a number > 0"
            )
        entry["perplexity"] = float(ppl)
        normalized[dataset] = entry
    return normalized


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"optimum-admm": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "optimum", "accelerate", "safetensors", "huggingface-hub", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def pruning_metadata(
    config: PruningConfig,
    report: PruningReport | None,
    evaluation_results: Mapping[str, Any] | None = None,
    masks_file: str | None = None,
) -> dict[str, Any]:
    """The content of ``pruning_config.json``: the recipe, calibration, per-layer sparsity, evaluation, versions.

    Example:
        >>> from optimum_admm import ADMMConfig
        >>> pruning_metadata(ADMMConfig(sparsity=0.6), None)["config"]["sparsity"]
        0.6
    """
    data: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "config": config.to_dict(),
        "storage": "dense",
    }
    if report is not None:
        data["calibration"] = dict(report.calibration)
        data["sparsity"] = report.sparsity
        data["mean_relative_error"] = report.mean_relative_error
        data["layers"] = {
            r.name: {"shape": list(r.shape), "sparsity": r.sparsity, "relative_error": r.relative_error}
            for r in report.layers
        }
    evaluation = normalize_evaluation_results(evaluation_results)
    if evaluation:
        data["evaluation"] = evaluation
    if masks_file is not None:
        data["masks"] = {"file": masks_file, "format": _MASK_FORMAT}
    data["lineage"] = [{"stage": "pruned", "method": config.method, "optimum_admm_version": __version__}]
    data["versions"] = _versions()
    return data


def read_pruning_metadata(
    save_dir: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> dict[str, Any]:
    """Read ``pruning_config.json`` from a saved pruned model: a local directory or a Hub repo id.

    Example:
        >>> read_pruning_metadata("smollm2-admm-60")["sparsity"]  # doctest: +SKIP
        0.6
    """
    path = saved_file(save_dir, PRUNING_CONFIG_NAME, revision=revision, token=token)
    return json.loads(path.read_text(encoding="utf-8"))


def load_pruning_config(
    save_dir: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> PruningConfig:
    """Rebuild the recipe (the config object) a pruned model was made with, from a local directory or a Hub repo
    (a :class:`~optimum_admm.structured.ShearingConfig` for a sheared model).

    Example:
        >>> load_pruning_config("smollm2-admm-60")  # doctest: +SKIP
        ADMMConfig(sparsity=0.6, mask_structure='unstructured', ...)
    """
    config = read_pruning_metadata(save_dir, revision=revision, token=token)["config"]
    if config.get("method") == "sheared_llama":  # a model saved by Sheared-LLaMA: its ShearingConfig
        from .structured.configuration import ShearingConfig

        return ShearingConfig.from_dict(config)  # type: ignore[return-value]
    return PruningConfig.from_dict(config)


def _pack_masks(model: nn.Module, report: PruningReport) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Non-zero masks of every pruned layer's ``weight`` (in the parameter's own layout), bit-packed; offloaded
    weights are read through the model's weight store."""
    from .stores import store_for

    store = store_for(model)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for row in report.layers:
        key = weight_name(model, row.name)  # one mask per fused experts tensor, whichever experts were pruned
        if key in tensors:
            continue
        weight = store.read(key)
        bits = np.packbits((weight != 0).flatten().cpu().numpy(), bitorder="little")
        tensors[key] = torch.from_numpy(bits)
        shapes[key] = list(weight.shape)
    return tensors, {"format": _MASK_FORMAT, "shapes": json.dumps(shapes)}


def load_masks(
    save_dir: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> dict[str, torch.Tensor]:
    """Load the masks saved with ``save_masks=True``: ``{parameter name: bool tensor}`` (``True`` = kept).

    The names are the model's parameter names (``"model.layers.0.mlp.up_proj.weight"``), the shapes those of the
    parameters, so a mask-preserving fine-tuning loop can multiply gradients or weights by them directly.

    Example:
        >>> masks = load_masks("smollm2-admm-60")  # doctest: +SKIP
        >>> for name, param in model.named_parameters():  # doctest: +SKIP
        ...     if name in masks:
        ...         param.data.mul_(masks[name])
    """
    from safetensors import safe_open

    try:
        path = saved_file(save_dir, MASKS_NAME, revision=revision, token=token)
    except InvalidArgumentError as err:
        raise InvalidArgumentError(f"{err} (masks are saved with save_masks=True)") from None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != _MASK_FORMAT:
            raise InvalidArgumentError(f"{path} has mask format {metadata.get('format')!r}; expected {_MASK_FORMAT!r}")
        shapes = json.loads(metadata["shapes"])
        masks = {}
        for key, shape in shapes.items():
            bits = handle.get_tensor(key).numpy()
            flat = np.unpackbits(bits, count=math.prod(shape), bitorder="little").astype(bool)
            masks[key] = torch.from_numpy(flat.reshape(shape))
    return masks


def write_pruning_files(
    staging: Path,
    config: PruningConfig,
    report: PruningReport | None,
    *,
    evaluation_results: Mapping[str, Any] | None = None,
    masks_file: str | None = None,
    card_kwargs: dict[str, Any] | None = None,
    model_config: Any = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``pruning_config.json`` and (with ``card_kwargs``) the model card into a directory being staged.

    The one writer of both files, for every output (:func:`save_pruned`, streaming, the CLI, and models derived from
    a pruned one, which pass their ``metadata``: :func:`optimum_admm.lineage.save_derived`); returns the sidecar.
    """
    if metadata is None:
        metadata = pruning_metadata(config, report, evaluation_results, masks_file)
    (staging / PRUNING_CONFIG_NAME).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    if card_kwargs is not None:
        from .card import build_model_card

        card = build_model_card(metadata, model_config=model_config, **card_kwargs)
        card.save(staging / "README.md")
    return metadata


def _write_contents(
    staging: Path,
    model: nn.Module,
    tokenizer: Any,
    config: PruningConfig,
    report: PruningReport | None,
    *,
    max_shard_size: int | str,
    save_masks: bool,
    evaluation_results: Mapping[str, Any] | None,
    card_kwargs: dict[str, Any] | None,
) -> None:
    from safetensors.torch import save_file

    model.save_pretrained(staging, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    masks_file = None
    if save_masks:
        assert report is not None  # checked by save_pruned
        tensors, metadata = _pack_masks(model, report)
        save_file(tensors, str(staging / MASKS_NAME), metadata=metadata)
        masks_file = MASKS_NAME
    write_pruning_files(
        staging,
        config,
        report,
        evaluation_results=evaluation_results,
        masks_file=masks_file,
        card_kwargs=card_kwargs,
        model_config=getattr(model, "config", None),
    )


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    config: PruningConfig,
    report: PruningReport | None,
    save_dir: str | os.PathLike,
    overwrite: bool = False,
    *,
    max_shard_size: int | str = "5GB",
    save_masks: bool = False,
    evaluation_results: Mapping[str, Any] | None = None,
    model_card: bool = True,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Save a pruned model atomically: a temporary sibling directory, renamed over ``save_dir`` once complete.

    Args:
        model: the pruned ``PreTrainedModel``.
        tokenizer: its tokenizer (or ``None``).
        config: the recipe it was pruned with.
        report: the pruning report (calibration, per-layer sparsity); ``None`` if unknown.
        save_dir: the target directory.
        overwrite: replace an existing non-empty ``save_dir``.
        max_shard_size: safetensors shard size (``"5GB"``, ``"500MB"`` or bytes); larger models are sharded with an
            index file, as transformers does.
        save_masks: also write ``masks.safetensors`` (bit-packed, see :func:`load_masks`).
        evaluation_results: ``{dataset: perplexity}`` measured on the pruned model, for the sidecar and the card.
        model_card: write a ``README.md`` model card.
        base_model: Hub id of the dense model (default: the model's ``_name_or_path`` when it is a Hub id).
        license: the card's license (default: the base model's when known locally).
        repo_id: the Hub repo the model is meant for (names the card and its usage snippet).

    Returns:
        The resolved target directory.

    Example:
        >>> save_pruned(pruner.model, pruner.tokenizer, pruner.config, pruner.report, "out")  # doctest: +SKIP
        PosixPath('/.../out')
    """
    target = check_save_dir(save_dir, overwrite).resolve()
    _check_max_shard_size(max_shard_size)
    if not isinstance(save_masks, bool):
        raise InvalidArgumentError(f"save_masks={save_masks!r} is invalid; allowed: True or False")
    if save_masks and (report is None or not report.layers):
        raise InvalidArgumentError("save_masks=True needs a pruned model (a PruningReport with layers); prune first")
    normalize_evaluation_results(evaluation_results)
    for name, value in (("base_model", base_model), ("license", license), ("repo_id", repo_id)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidArgumentError(f"{name}={value!r} is invalid; allowed: a non-empty string or None")
    card_kwargs = None
    if model_card:  # the usage snippet names the repo, else the directory as the caller gave it
        card_kwargs = {
            "base_model": base_model,
            "license": license,
            "repo_id": repo_id,
            "location": os.fspath(save_dir),
        }

    with staged_directory(target) as staging:
        _write_contents(
            staging,
            model,
            tokenizer,
            config,
            report,
            max_shard_size=max_shard_size,
            save_masks=save_masks,
            evaluation_results=evaluation_results,
            card_kwargs=card_kwargs,
        )
    logger.info("saved the pruned model to %s", target)
    return target
