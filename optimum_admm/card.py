"""The model card (``README.md``) of a pruned model, built with ``huggingface_hub.ModelCard``.

The card's metadata says what the Hub needs to list the model (``base_model``, ``library_name``, ``pipeline_tag``,
``license``, tags, a ``model-index`` with the measured perplexity); its body says what was done (method, settings,
calibration data, per-layer sparsity), how to reproduce it with the CLI, and that the weights are stored dense.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .loading import offline_mode

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

__all__ = ["build_model_card", "reproduce_command"]

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Benchmarks the library knows by name: card name, Hub dataset id, config and split of the perplexity text.
_KNOWN_DATASETS = {
    "wikitext2": ("WikiText-2", "wikitext", "wikitext-2-raw-v1", "test"),
    "c4": ("C4 (validation slice)", "allenai/c4", "en", "validation"),
}
_CLI_FIELDS = ("sparsity", "mask_structure", "num_samples", "sequence_length", "seed")
_MAX_LAYER_ROWS = 12


def _is_hub_id(name: Any) -> bool:
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and not Path(name).exists()


def _fetched_card(repo_id: str) -> list[Path]:
    """The base model's card downloaded from the Hub (one quick request; nothing when it fails)."""
    from huggingface_hub import HfApi, hf_hub_download

    try:  # one request without retries first: without a network the save must not wait for the download's backoff
        info = HfApi().model_info(repo_id, timeout=5)
        if "README.md" not in {sibling.rfilename for sibling in info.siblings or []}:
            return []
        return [Path(hf_hub_download(repo_id, "README.md", etag_timeout=5))]
    except Exception as err:  # no network, no card, a gated repo: the card just has no license field
        logger.debug("could not fetch the model card of %s: %s", repo_id, err)
        return []


def _base_license(base_model: str | None, name_or_path: str | None) -> str | None:
    """The base model's license: from a local card, the HF cache, or (online) the base model's card on the Hub."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    candidates: list[Path] = []
    if name_or_path and Path(name_or_path, "README.md").is_file():
        candidates.append(Path(name_or_path, "README.md"))
    if base_model and _is_hub_id(base_model):
        try:
            cached = try_to_load_from_cache(base_model, "README.md")
        except Exception:  # a malformed cache must never stop a save
            cached = None
        if isinstance(cached, (str, os.PathLike)):
            candidates.append(Path(cached))
        elif not offline_mode():
            candidates.extend(_fetched_card(base_model))
    for path in candidates:
        try:
            license_ = ModelCard.load(path).data.license
        except Exception as err:  # an unreadable base card only costs the license field
            logger.debug("could not read the base model card %s: %s", path, err)
            continue
        if isinstance(license_, str) and license_:
            return license_
    return None


def base_model_and_license(
    model_config: Any, base_model: str | None, license: str | None
) -> tuple[str | None, str | None, str | None]:
    """``(base_model, license, name_or_path)`` for a card: the base model defaults to the config's
    ``_name_or_path`` when that is a Hub id, the license to the base model's (see :func:`_base_license`)."""
    name_or_path = getattr(model_config, "_name_or_path", None) or None
    if base_model is None and _is_hub_id(name_or_path):
        base_model = name_or_path
    if license is None:
        license = _base_license(base_model, name_or_path)
    return base_model, license, name_or_path


def _method_summary(method: str) -> str:
    """First paragraph of the method's config docstring (the registry knows every method; nothing hard-coded)."""
    try:
        from .registry import config_class_for

        doc = config_class_for(method).__doc__ or ""
    except ValueError:
        doc = ""
    paragraph = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines()) or f"The `{method}` pruning method."


_DATASETS_DESCRIPTION = re.compile(
    r"datasets:(?P<name>[^\[/]+(?:/[^\[/]+)?)(?:/(?P<config>[^\[]+))?\[(?P<split>[^\]]+)\]\.(?P<column>.+)"
)


def _dataset_flags(dataset: str | None) -> list[str] | None:
    """The CLI flags of a calibration source recorded as ``datasets:name[/config][split].column``."""
    match = _DATASETS_DESCRIPTION.fullmatch(dataset or "")
    if match is None:
        return None
    flags = ["--dataset", match["name"]]
    if match["config"]:
        flags += ["--dataset-config", match["config"]]
    return [*flags, "--dataset-split", match["split"], "--text-column", match["column"]]


def _dataset_ids(metadata: dict[str, Any]) -> list[str]:
    """Hub dataset ids of the calibration and evaluation data, for the card's ``datasets:`` field."""
    ids = []
    sources = [(metadata.get("calibration") or {}).get("dataset"), *(metadata.get("evaluation") or {})]
    for source in sources:
        if source in _KNOWN_DATASETS:
            ids.append(_KNOWN_DATASETS[source][1])
        elif (match := _DATASETS_DESCRIPTION.fullmatch(source or "")) and _is_hub_id(match["name"]):
            ids.append(match["name"])
    return list(dict.fromkeys(ids))


def _dataset_argument(dataset: str | None) -> tuple[str, str | None]:
    """The ``--dataset`` value that reproduces a calibration source, and a note when it cannot be exact."""
    if dataset in _KNOWN_DATASETS:
        return dataset, None
    if isinstance(dataset, str) and dataset.startswith("file:"):
        name = dataset[len("file:") :]
        return name, f"`{name}` is the local calibration text file used for this run (not included here)."
    return "CALIBRATION.txt", f"The calibration data was `{dataset}`; pass a text file with comparable text."


def reproduce_command(metadata: dict[str, Any], base_model: str | None, output: str = "pruned-model") -> str:
    """The ``optimum-cli admm prune`` command that reproduces a run described by ``pruning_config.json``.

    Settings that have no flag of their own are passed through ``--recipe pruning_config.json``.

    Example:
        >>> from optimum_admm import ADMMConfig
        >>> from optimum_admm.export import pruning_metadata
        >>> print(reproduce_command(pruning_metadata(ADMMConfig(sparsity=0.6), None), "org/model", "out"))
        optimum-cli admm prune --model org/model --method admm --sparsity 0.6 --pattern unstructured --dataset CALIBRATION.txt --num-samples 128 --sequence-length 2048 --seed 0 --output out
    """
    config = dict(metadata["config"])
    method = metadata.get("method", config.get("method"))
    recorded = metadata.get("calibration", {}).get("dataset")
    dataset, _ = _dataset_argument(recorded)
    dataset_flags = _dataset_flags(recorded) or ["--dataset", dataset]
    args = ["optimum-cli", "admm", "prune", "--model", base_model or "DENSE_MODEL_PATH", "--method", str(method)]
    needs_recipe = True
    try:
        from .registry import config_class_for

        cls = config_class_for(method)
        rebuilt = cls(**{name: config[name] for name in _CLI_FIELDS}).to_dict()
        rebuilt.pop("optimum_admm_version")
        needs_recipe = rebuilt != {k: v for k, v in config.items() if k != "optimum_admm_version"}
    except (ValueError, KeyError, TypeError):
        pass
    if needs_recipe:
        args += ["--recipe", "pruning_config.json"]
    else:
        args += ["--sparsity", f"{config['sparsity']:g}", "--pattern", config["mask_structure"]]
    args += dataset_flags
    if not needs_recipe:
        args += ["--num-samples", str(config["num_samples"]), "--sequence-length", str(config["sequence_length"])]
        args += ["--seed", str(config["seed"])]
    args += ["--output", output]
    return shlex.join(args)


def _eval_results(evaluation: dict[str, dict[str, Any]]) -> list[Any]:
    from huggingface_hub import EvalResult

    results = []
    for key, entry in evaluation.items():
        if "perplexity" not in entry:  # an lm-eval task's metrics
            results += [
                EvalResult(
                    task_type="text-generation",
                    task_name=key,
                    dataset_type=key,
                    dataset_name=key,
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=round(float(value), 4),
                )  # fmt: skip
                for metric, value in entry.items()
            ]
            continue
        known = _KNOWN_DATASETS.get(key)
        if known is not None:
            name, dataset_type, config_name, split = known
        elif _is_hub_id(key) and not Path(key).suffix:
            name, dataset_type, config_name, split = key, key, None, None
        else:  # a local file: named, but never passed off as a Hub dataset id
            name, dataset_type, config_name, split = f"{key} (local file)", "text", None, None
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Causal language modeling",
                dataset_type=dataset_type,
                dataset_name=name,
                dataset_config=config_name,
                dataset_split=split,
                metric_type="perplexity",
                metric_name="Perplexity",
                metric_value=round(float(entry["perplexity"]), 4),
            )
        )
    return results


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def _layers_section(layers: dict[str, dict[str, Any]]) -> str:
    if not layers:
        return "No per-layer report was recorded for this save."
    sparsities = [float(v["sparsity"]) for v in layers.values()]
    text = (
        f"{len(layers)} linear layers pruned; per-layer sparsity from {min(sparsities):.4f} to "
        f"{max(sparsities):.4f}. Every layer is listed in `pruning_config.json`.\n\n"
        "| layer | shape | sparsity | relative error |\n|---|---|---|---|\n"
    )
    rows = []
    for name, row in list(layers.items())[:_MAX_LAYER_ROWS]:
        shape = "x".join(str(d) for d in row.get("shape", []))
        error = row.get("relative_error")
        rows.append(
            f"| `{name}` | {shape} | {float(row['sparsity']):.4f} | {'n/a' if error is None else f'{error:.3e}'} |"
        )
    if len(layers) > _MAX_LAYER_ROWS:
        rows.append(f"| ... {len(layers) - _MAX_LAYER_ROWS} more | | | |")
    return text + "\n".join(rows)


def _lineage(metadata: dict[str, Any]) -> list[str]:
    """A line on what happened to the model after pruning (fine-tuning, a LoRA merge), from the sidecar's lineage."""
    lineage = metadata.get("lineage") or []
    if len(lineage) < 2:
        return []
    stages = " → ".join(str(entry.get("stage", "?")) for entry in lineage)
    return [f"Lineage: {stages}. The sparsity above is measured on these weights."]


def _body(
    metadata: dict[str, Any],
    base_model: str | None,
    model_name: str,
    repo_id: str | None,
    location: str | None = None,
    source: str | None = None,
) -> str:
    config = metadata["config"]
    method = metadata["method"]
    pattern = config.get("mask_structure", "unstructured")
    sparsity = metadata.get("sparsity", config.get("sparsity"))
    base_text = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "a dense causal LM"
    calibration = metadata.get("calibration") or {}
    _, dataset_note = _dataset_argument(calibration.get("dataset"))
    settings = [(f"`{k}`", f"`{v}`") for k, v in config.items() if k not in ("optimum_admm_version",)]
    parts = [
        f"# {model_name}",
        f"{base_text} pruned to **{float(sparsity):.1%}** sparsity ({pattern}) with **{method}**, using "
        f"[optimum-admm](https://github.com/optimum-admm/optimum-admm) {config.get('optimum_admm_version', '')}.",
        *_lineage(metadata),
        "## Method",
        _method_summary(method),
        "## Settings",
        _table(settings, ("setting", "value")),
        "## Calibration data",
        _table([(f"`{k}`", f"`{v}`") for k, v in calibration.items()], ("field", "value"))
        if calibration
        else "The method used no calibration data (or none was recorded).",
    ]
    evaluation = metadata.get("evaluation") or {}
    if evaluation:
        rows = []
        tasks = [(f"`{k}`", ", ".join(f"{m} {v:.4f}" for m, v in e.items())) for k, e in evaluation.items()
                 if "perplexity" not in e]  # fmt: skip
        evaluation = {k: e for k, e in evaluation.items() if "perplexity" in e}
        for key, entry in evaluation.items():
            extra = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "perplexity")
            rows.append(
                (_KNOWN_DATASETS.get(key, (key,))[0], f"{entry['perplexity']:.4f}" + (f" ({extra})" if extra else ""))
            )
        parts += ["## Evaluation"]
        parts += [_table(rows, ("dataset", "perplexity"))] if rows else []
        parts += [_table(tasks, ("lm-eval task", "metrics"))] if tasks else []
    parts += ["## Per-layer sparsity", _layers_section(metadata.get("layers") or {})]
    parts += [
        "## Storage: dense",
        "The weights are stored **dense**: pruned entries are exact zeros in ordinary safetensors files, so the "
        "checkpoint is as large as the dense model and loads with plain `transformers` (no `quantization_config` "
        "or compressed-tensors `sparsity_config` is written). Memory or speed gains need a runtime with sparse "
        "kernels (for example 2:4 sparsity on recent NVIDIA GPUs)."
        + (
            " `masks.safetensors` holds the bit-packed masks for mask-preserving fine-tuning."
            if metadata.get("masks")
            else ""
        ),
        "## Usage",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id or location or model_name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id or location or model_name}")\n```',
        "## Reproduce",
        f"```bash\n{reproduce_command(metadata, source or base_model, output=model_name)}\n```"
        + (f"\n\n{dataset_note}" if dataset_note else ""),
        "## Versions",
        _table([(f"`{k}`", f"`{v}`") for k, v in (metadata.get("versions") or {}).items()], ("package", "version")),
    ]
    return "\n\n".join(parts) + "\n"


def build_model_card(
    metadata: dict[str, Any],
    *,
    model_config: Any = None,
    base_model: str | None = None,
    license: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    location: str | None = None,
) -> ModelCard:
    """Build the model card of a pruned model from its ``pruning_config.json`` content.

    Args:
        metadata: the sidecar content (:func:`optimum_admm.export.pruning_metadata`).
        model_config: the model's ``PretrainedConfig``; its ``_name_or_path`` is the base model when it is a Hub id.
        base_model: Hub id of the dense model (overrides ``model_config``).
        license: the license (default: the base model's, when its card is available locally or in the HF cache).
        model_name: the card title and ``model-index`` name (default: derived from the base model and the recipe).
        repo_id: where the model will live, for the usage snippet.
        location: the local directory it is saved to, for the usage snippet when there is no ``repo_id``.

    Returns:
        A ``huggingface_hub.ModelCard`` (``card.save(path)``, ``str(card)``).

    Example:
        >>> from optimum_admm import ADMMConfig
        >>> from optimum_admm.export import pruning_metadata
        >>> card = build_model_card(pruning_metadata(ADMMConfig(sparsity=0.6), None), base_model="org/model")
        >>> card.data.base_model, "pruned" in card.data.tags
        ('org/model', True)
    """
    from huggingface_hub import ModelCard, ModelCardData

    base_model, license, name_or_path = base_model_and_license(model_config, base_model, license)
    config = metadata["config"]
    method = metadata["method"]
    pattern = str(config.get("mask_structure", "unstructured"))
    sparsity = float(config.get("sparsity", 0.0))
    if model_name is None and repo_id:
        model_name = repo_id.split("/")[-1]
    if model_name is None:
        stem = (base_model or repo_id or "model").split("/")[-1]
        model_name = f"{stem}-{method}-{pattern.replace(':', 'of')}-{round(sparsity * 100)}"
    evaluation = metadata.get("evaluation") or {}
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        model_name=model_name,
        tags=["pruned", "sparse", method, pattern, "optimum-admm"],
        datasets=_dataset_ids(metadata) or None,
        eval_results=_eval_results(evaluation) or None,
    )
    source = base_model or (name_or_path if name_or_path and Path(name_or_path).exists() else None)
    body = _body(metadata, base_model, model_name, repo_id, location, source)
    content = f"---\n{data.to_yaml()}\n---\n\n{body}"
    return ModelCard(content)
