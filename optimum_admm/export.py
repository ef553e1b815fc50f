"""Saving a pruned model: safetensors that plain transformers loads, the tokenizer and ``pruning_config.json``.

Writes are atomic: everything goes to a temporary directory beside the target, which is renamed into place only
when complete, so an interrupted save never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .configuration import PruningConfig
from .reporting import PruningReport
from .version import __version__

__all__ = ["check_save_dir", "save_pruned", "PRUNING_CONFIG_NAME"]

PRUNING_CONFIG_NAME = "pruning_config.json"


def check_save_dir(save_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any work, a ``save_dir`` that is a file or a non-empty directory (unless ``overwrite``)."""
    path = Path(save_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"save_dir={str(save_dir)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"save_dir={str(save_dir)!r} is a non-empty directory; pass overwrite=True to replace it")
    return path


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"optimum-admm": __version__}
    for name in ("torch", "transformers", "optimum", "accelerate", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def pruning_metadata(config: PruningConfig, report: PruningReport | None) -> dict[str, Any]:
    """The content of ``pruning_config.json``: the recipe, calibration, per-layer sparsity and versions."""
    data: dict[str, Any] = {"method": config.method, "config": config.to_dict(), "versions": _versions()}
    if report is not None:
        data["calibration"] = report.calibration
        data["sparsity"] = report.sparsity
        data["mean_relative_error"] = report.mean_relative_error
        data["layers"] = {r.name: {"sparsity": r.sparsity, "relative_error": r.relative_error} for r in report.layers}
    return data


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    config: PruningConfig,
    report: PruningReport | None,
    save_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Save atomically: a temporary sibling directory, renamed over ``save_dir`` once complete."""
    target = check_save_dir(save_dir, overwrite).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / PRUNING_CONFIG_NAME).write_text(json.dumps(pruning_metadata(config, report), indent=2) + "\n")
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(backup)
            staging.rename(target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
