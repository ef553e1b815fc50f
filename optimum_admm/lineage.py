"""Saving a model derived from a pruned one (fine-tuned, LoRA-merged) with the same files as a pruned model.

:func:`save_derived` writes what :func:`optimum_admm.export.save_pruned` writes (safetensors, tokenizer,
``pruning_config.json``, masks on request, the model card), through the same staged directory and the same writer of
the sidecar and the card. The sidecar keeps the source's recipe and calibration, replaces the per-layer sparsity by
what the model holds now (measured), and extends the lineage: base → pruned → fine-tuned → ...

Example:
    >>> from optimum_admm.lineage import save_derived
    >>> trainer.train()  # doctest: +SKIP
    >>> save_derived(trainer.model, "smollm2-admm-60-ft", stage="fine-tuned", source="smollm2-admm-60",  # doctest: +SKIP
    ...              tokenizer=tokenizer)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .configuration import PruningConfig
from .errors import InvalidArgumentError
from .version import __version__

__all__ = ["derived_metadata", "save_derived"]


def _measured_layers(model: nn.Module, names: list[str]) -> dict[str, dict[str, Any]]:
    from .stores import store_for

    store = store_for(model)
    layers = {}
    for name in names:
        weight = store.read(f"{name}.weight")
        zeros = int(weight.numel() - int((weight != 0).sum()))
        layers[name] = {"shape": list(weight.shape), "sparsity": zeros / weight.numel(), "relative_error": None}
    return layers


def _source_metadata(model: nn.Module, source: str | os.PathLike | None, revision: str | None, token: Any) -> dict:
    from .export import read_pruning_metadata

    if source is not None:
        return read_pruning_metadata(source, revision=revision, token=token)
    section = getattr(getattr(model, "config", None), "pruning", None)
    if not section:
        raise InvalidArgumentError(
            "model is not a pruned model (no pruning section in its config, and no source=...); allowed: a model "
            "pruned by optimum-admm, or source= the directory or repo id of the model it was derived from"
        )
    recipe = {
        "method": section["method"],
        "sparsity": section["sparsity"],
        "mask_structure": section["mask_structure"],
    }
    config = PruningConfig.from_dict(recipe)
    return {"format_version": 1, "method": config.method, "config": config.to_dict(), "storage": "dense"}


def derived_metadata(
    model: nn.Module,
    stage: str,
    *,
    source: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> dict[str, Any]:
    """The sidecar of a model derived from a pruned one: the source's, with the sparsity measured now and the lineage
    extended by ``stage``."""
    from .export import _versions

    if not isinstance(stage, str) or not stage.strip():
        raise InvalidArgumentError(f"stage={stage!r} is invalid; allowed: a name such as 'fine-tuned'")
    metadata = dict(_source_metadata(model, source, revision, token))
    names = list(metadata.get("layers") or [])
    if not names:  # the source recorded no layers: the decoder blocks' linears
        from .configuration import default_of
        from .modeling import find_decoder_blocks, find_prunable_layers

        config = PruningConfig.from_dict(metadata["config"])
        blocks_name, blocks = find_decoder_blocks(model)
        defaults = default_of(type(config), "targets")  # as the pruner: "Conv1D" on a model without Conv1D is fine
        found = find_prunable_layers(model, config.targets, config.ignore, blocks, blocks_name, defaults)
        names = [n for block in found for n in block]
    layers = _measured_layers(model, names)
    total = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    metadata["layers"] = layers
    metadata["sparsity"] = sum(v["sparsity"] * v["shape"][0] * v["shape"][1] for v in layers.values()) / total
    metadata.pop("mean_relative_error", None)  # measured on the source's weights, not these
    metadata.pop("evaluation", None)
    lineage = list(metadata.get("lineage") or [{"stage": "pruned", "method": metadata["method"]}])
    entry = {"stage": stage, "sparsity": metadata["sparsity"], "optimum_admm_version": __version__}
    if source is not None:
        entry["from"] = os.fspath(source)
    metadata["lineage"] = [*lineage, entry]
    metadata["versions"] = _versions()
    return metadata


def save_derived(
    model: nn.Module,
    save_dir: str | os.PathLike,
    *,
    stage: str = "fine-tuned",
    source: str | os.PathLike | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    save_masks: bool = False,
    max_shard_size: int | str = "5GB",
    evaluation_results: dict[str, Any] | None = None,
    model_card: bool = True,
    base_model: str | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Save a fine-tuned (or LoRA-merged, ...) copy of a pruned model with its sidecar, lineage, masks and card.

    Args:
        model: the derived model (still sparse: :class:`~optimum_admm.training.SparsityPreservingCallback` keeps it).
        save_dir: the output directory, staged and renamed into place.
        stage: what was done to it, recorded in the lineage (``"fine-tuned"``, ``"lora-merged"``).
        source: the pruned model it came from (directory or Hub repo id), whose sidecar gives the recipe and lineage;
            default: the ``pruning`` section of ``model.config``.
        tokenizer: the tokenizer to save beside it.
        overwrite: replace a non-empty ``save_dir``.
        save_masks: also write ``masks.safetensors`` of the current zeros.
        max_shard_size: safetensors shard size.
        evaluation_results: ``{dataset: perplexity}`` measured on this model, for the sidecar and the card.
        model_card: write a ``README.md`` model card.
        base_model: Hub id of the dense model, for the card.
        repo_id: the Hub repo the model is meant for (the card's usage snippet).
        revision: the revision of a Hub ``source``.
        token: a Hub token for a Hub ``source``.

    Example:
        >>> save_derived(model, "ft", stage="fine-tuned", source="me/smollm2-admm-60")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    from .export import MASKS_NAME, _pack_masks, check_save_dir, normalize_evaluation_results, write_pruning_files
    from .files import staged_directory
    from .reporting import LayerReport, PruningReport

    target = check_save_dir(save_dir, overwrite).resolve()
    metadata = derived_metadata(model, stage, source=source, revision=revision, token=token)
    evaluation = normalize_evaluation_results(evaluation_results)
    if evaluation:
        metadata["evaluation"] = evaluation
    card = {"base_model": base_model, "repo_id": repo_id, "location": os.fspath(save_dir)} if model_card else None
    with staged_directory(target) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if save_masks:
            rows = [LayerReport(n, tuple(v["shape"]), v["sparsity"], None, 0.0) for n, v in metadata["layers"].items()]
            tensors, mask_metadata = _pack_masks(model, PruningReport(metadata["method"], {}, rows))
            save_file(tensors, str(staging / MASKS_NAME), metadata=mask_metadata)
            metadata["masks"] = {"file": MASKS_NAME, "format": mask_metadata["format"]}
        write_pruning_files(
            staging, None, None, card_kwargs=card, model_config=getattr(model, "config", None), metadata=metadata
        )  # type: ignore[arg-type]
    return target
