"""Whether and how a model was pruned: ``optimum_admm.inspect(model | directory | repo id)``.

A pruned model carries a small ``pruning`` section in its ``config.json`` (method, sparsity, structure, library
version, the sidecar's file name), which plain transformers keeps as a config attribute and writes back on every
``save_pretrained`` (so a fine-tuned copy still says where it came from), and the full sidecar
``pruning_config.json``. :func:`inspect` reads both and measures the sparsity of the linear layers inside the decoder
blocks, by kind (attention, MLP, other): on a loaded model, on the tensors of a local checkpoint (read one at a time),
or, for a Hub repo, from the per-layer sparsity the sidecar recorded (nothing large is downloaded).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .version import __version__

__all__ = ["InspectionReport", "config_section", "inspect"]

_BLOCK = re.compile(r"(^|\.)(layers|h|blocks|layer)\.\d+\.")
_KINDS = (("attention", ("attn", "attention")), ("mlp", ("mlp", "ffn", "feed_forward", "fc1", "fc2")))


def config_section(method: str, sparsity: float, mask_structure: str, sidecar: str = "pruning_config.json") -> dict:
    """The ``pruning`` section a pruned model's ``config.json`` gets.

    Example:
        >>> config_section("admm", 0.5, "2:4")["mask_structure"]
        '2:4'
    """
    return {
        "method": method,
        "sparsity": sparsity,
        "mask_structure": mask_structure,
        "library": "optimum-admm",
        "library_version": __version__,
        "sidecar": sidecar,
    }


def _kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in _KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


@dataclass
class InspectionReport:
    """What :func:`inspect` found.

    Example:
        >>> report = InspectionReport(pruned=True, method="admm", sparsity_by_kind={"mlp": 0.5})
        >>> report.pruned, report.sparsity_by_kind["mlp"]
        (True, 0.5)
    """

    pruned: bool
    method: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    sparsity_by_kind: dict[str, float] = field(default_factory=dict)
    layers: dict[str, float] = field(default_factory=dict)
    #: "measured" from the weights, or "recorded" from the sidecar (a Hub repo, nothing downloaded)
    source: str = "measured"

    def __str__(self) -> str:
        if not self.pruned:
            return "not pruned (no pruning section, no sidecar, no sparse decoder layers)"
        kinds = ", ".join(f"{kind} {value:.1%}" for kind, value in sorted(self.sparsity_by_kind.items()))
        structure = self.recipe.get("mask_structure", "structured" if self.method == "sheared_llama" else "?")
        return f"pruned with {self.method} ({structure}); sparsity ({self.source}): {kinds}; {len(self.layers)} layers"


def _sparsity_by_kind(layers: dict[str, tuple[int, int]]) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for name, (zeros, count) in layers.items():
        entry = totals.setdefault(_kind(name), [0, 0])
        entry[0] += zeros
        entry[1] += count
    return {kind: zeros / count for kind, (zeros, count) in totals.items() if count}


def _from_weights(named: Any) -> dict[str, tuple[int, int]]:
    """``{layer: (zeros, elements)}`` of the 2-D weights inside decoder blocks."""
    counts = {}
    for name, tensor in named:
        if name.endswith(".weight") and tensor.dim() == 2 and _BLOCK.search(name) and not tensor.is_meta:
            counts[name[: -len(".weight")]] = (int(tensor.numel() - torch.count_nonzero(tensor)), tensor.numel())
    return counts


def _local_tensors(directory: Path) -> Any:
    from safetensors import safe_open

    for shard in sorted(directory.glob("*.safetensors")):
        if shard.name == "masks.safetensors":
            continue
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                yield key, handle.get_tensor(key)


def _metadata(name_or_path: str | os.PathLike, revision: str | None, token: Any) -> tuple[dict, dict]:
    """The ``pruning`` section of ``config.json`` and the sidecar (each ``{}`` when absent)."""
    from .errors import InvalidArgumentError
    from .hub_files import saved_file

    found = []
    for filename in ("config.json", "pruning_config.json"):
        try:
            found.append(json.loads(saved_file(name_or_path, filename, revision=revision, token=token).read_text()))
        except InvalidArgumentError:
            found.append({})
    config, sidecar = found
    return dict(config.get("pruning") or {}), sidecar


def inspect(
    model_or_path: nn.Module | str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> InspectionReport:
    """Whether and how a model was pruned: recipe, lineage, and the sparsity of its decoder layers by kind.

    Args:
        model_or_path: a loaded model, a local checkpoint directory or a Hub repo id.
        revision: the Hub revision (repo ids only).
        token: a Hub token (repo ids only; default: ``HF_TOKEN`` or the stored login).

    Example:
        >>> from optimum_admm import inspect
        >>> print(inspect("me/smollm2-admm-60"))  # doctest: +SKIP
        pruned with admm (unstructured); sparsity (recorded): attention 60.0%, mlp 60.0%; 210 layers
    """
    if isinstance(model_or_path, nn.Module):
        config = getattr(model_or_path, "config", None)
        section, sidecar = dict(getattr(config, "pruning", None) or {}), {}
        counts = _from_weights(model_or_path.state_dict().items())
        source = "measured"
    else:
        section, sidecar = _metadata(model_or_path, revision, token)
        local = Path(model_or_path)
        if local.is_dir():
            counts, source = _from_weights(_local_tensors(local)), "measured"
        else:
            recorded = sidecar.get("layers") or {}
            counts = {n: (round(v["sparsity"] * v["shape"][0] * v["shape"][1]), v["shape"][0] * v["shape"][1])
                      for n, v in recorded.items()}  # fmt: skip
            source = "recorded"
    layers = {name: zeros / count for name, (zeros, count) in counts.items() if count}
    method = section.get("method") or sidecar.get("method")
    recipe = dict(sidecar.get("config") or {k: v for k, v in section.items() if k in ("sparsity", "mask_structure")})
    lineage = list(sidecar.get("lineage") or ([{"stage": "pruned", "method": method}] if method else []))
    pruned = bool(method) or any(value >= 0.25 for value in layers.values())
    return InspectionReport(pruned, method, recipe, lineage, _sparsity_by_kind(counts), layers, source)
