"""A sheared model saved like a pruned one: safetensors, ``pruning_config.json`` sidecar, config section, card, push.

:func:`write_sheared` writes, into a directory being staged: the sliced model (``save_pretrained``, without the
training-only ``use_cache: false`` the Trainer leaves in the config), the tokenizer, ``shearing_config.json`` and
``shearing_state.safetensors`` (the recipe and the trained gates), the sidecar ``pruning_config.json`` (method
``sheared_llama``: the recipe, the source and target shapes, parameters, tokens seen, a summary of the gate
trajectory, the evaluation, the lineage and the versions), a ``pruning`` section in ``config.json`` (what
:func:`optimum_admm.inspect` reads), and a model card built with ``huggingface_hub.ModelCard``.
:meth:`ShearingResult.save_pretrained <optimum_admm.structured.api.ShearingResult.save_pretrained>` stages it (an
interrupted save leaves nothing that looks complete) and pushes it with the one Hub uploader.

When the expected shape under the final gates ended far from the target (over :data:`FAR_FROM_TARGET` relative in
any dimension), the final top-k still gives the exact target shape, but the slice is not what the gates learnt: a
warning with the numbers is logged and recorded in the sidecar (``gates.far_from_target``).

Example:
    >>> result = shear(model, config, data, max_steps=200)  # doctest: +SKIP
    >>> result.save_pretrained("sheared", tokenizer=tokenizer, push_to_hub=True,
    ...     repo_id="me/smollm2-sheared-56m")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..version import __version__

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

__all__ = ["FAR_FROM_TARGET", "build_sheared_card", "far_from_target", "shearing_metadata", "write_sheared"]

logger = logging.getLogger(__name__)

METHOD = "sheared_llama"
#: Relative gap between the expected and the target size of a dimension above which the save warns.
FAR_FROM_TARGET = 0.10
_TRAJECTORY_POINTS = 20
_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def far_from_target(expected: dict[str, float], target: dict[str, int]) -> dict[str, dict[str, float]]:
    """The dimensions whose expected size is over :data:`FAR_FROM_TARGET` (relative) from the target.

    Example:
        >>> far_from_target({"hidden_size": 62.8, "num_hidden_layers": 2.0}, {"hidden_size": 32, "num_hidden_layers": 2})
        {'hidden_size': {'expected': 62.8, 'target': 32, 'relative_gap': 0.9625}}
    """
    out = {}
    for name, goal in target.items():
        value = expected.get(name)
        if value is None or not goal:
            continue
        gap = abs(float(value) - goal) / goal
        if gap > FAR_FROM_TARGET:
            out[name] = {"expected": round(float(value), 4), "target": goal, "relative_gap": round(gap, 4)}
    return out


def _trajectory(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most 20 evenly spaced points of the logged expected shape (the first and the last included)."""
    points = [h for h in history if any(k.startswith("shear/expected/") for k in h)]
    if len(points) > _TRAJECTORY_POINTS:
        step = (len(points) - 1) / (_TRAJECTORY_POINTS - 1)
        points = [points[round(i * step)] for i in range(_TRAJECTORY_POINTS)]
    out = []
    for point in points:
        row = {"step": point.get("step")}
        row.update(
            {k: round(float(point[f"shear/expected/{k}"]), 4) for k in _SHAPE_KEYS if f"shear/expected/{k}" in point}
        )
        out.append(row)
    return out


def shearing_metadata(
    shearing: Any,
    *,
    source_parameters: int | None,
    parameters: int,
    steps: int | None = None,
    tokens_seen: int | None = None,
    history: list[dict[str, Any]] | None = None,
    evaluation_results: dict[str, Any] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """The content of a sheared model's ``pruning_config.json``."""
    from ..export import _versions, normalize_evaluation_results

    plan = shearing.plan
    expected = shearing.expected_shape()
    far = far_from_target(expected, plan.target)
    data: dict[str, Any] = {
        "format_version": 1,
        "method": METHOD,
        "config": shearing.config.to_dict(),
        "storage": "dense",
        "source_shape": dict(plan.source),
        "target_shape": dict(plan.target),
        "parameters": {"source": source_parameters, "sheared": parameters},
        "sparsity": None if not source_parameters else 1.0 - parameters / source_parameters,
        "training": {"steps": steps, "tokens_seen": tokens_seen},
        "gates": {
            "final_expected_shape": {k: round(v, 4) for k, v in expected.items()},
            "far_from_target": far,
            "multipliers": shearing.lagrangian.values(),
            "binariness": shearing.gates.binariness(),
            "trajectory": _trajectory(history or []),
        },
    }
    trajectory = data["gates"]["trajectory"]
    if not trajectory or trajectory[-1].get("step") != steps:  # the end point, also when no step was logged
        trajectory.append({"step": steps, **{k: round(float(expected[k]), 4) for k in _SHAPE_KEYS if k in expected}})
    evaluation = normalize_evaluation_results(evaluation_results)
    if evaluation:
        data["evaluation"] = evaluation
    entry: dict[str, Any] = {"stage": "sheared", "method": METHOD, "optimum_admm_version": __version__}
    if source is not None:
        entry["from"] = source
    data["lineage"] = [entry]
    data["versions"] = _versions()
    return data


def _shape_rows(metadata: dict[str, Any]) -> list[tuple[str, str]]:
    source, target = metadata["source_shape"], metadata["target_shape"]
    return [(f"`{name}`", f"{source[name]} → {target[name]}") for name in source]


def build_sheared_card(
    metadata: dict[str, Any],
    *,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    location: str | None = None,
    model_config: Any = None,
) -> ModelCard:
    """The model card of a sheared model, from its sidecar.

    Example:
        >>> meta = {"method": "sheared_llama", "config": {}, "source_shape": {"num_hidden_layers": 4},
        ...         "target_shape": {"num_hidden_layers": 2}, "parameters": {"source": 100, "sheared": 60},
        ...         "training": {"steps": 10, "tokens_seen": 5120}, "gates": {}, "versions": {}}
        >>> card = build_sheared_card(meta, base_model="org/model", license="apache-2.0")
        >>> card.data.license, "sheared-llama" in card.data.tags
        ('apache-2.0', True)
    """
    from huggingface_hub import ModelCard, ModelCardData

    from ..card import _eval_results, _table, base_model_and_license

    base_model, license, _ = base_model_and_license(model_config, base_model, license)
    stem = (base_model or "model").split("/")[-1]
    target_layers = metadata["target_shape"].get("num_hidden_layers")
    model_name = repo_id.split("/")[-1] if repo_id else f"{stem}-sheared-{target_layers}l"
    evaluation = metadata.get("evaluation") or {}
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        model_name=model_name,
        tags=["pruned", "structured-pruning", "sheared-llama", "optimum-admm"],
        eval_results=_eval_results(evaluation) or None,
    )
    params = metadata.get("parameters") or {}
    training = metadata.get("training") or {}
    gates = metadata.get("gates") or {}
    base_text = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "A LLaMA-like causal LM"
    size = (
        f" ({params['source']:,} → {params['sheared']:,} parameters, {params['sheared'] / params['source']:.1%} of the"
        " source)"
        if params.get("source") and params.get("sheared")
        else ""
    )
    where = repo_id or location or model_name
    parts = [
        f"# {model_name}",
        f"{base_text} pruned to a smaller standard shape with **Sheared-LLaMA** targeted structured pruning{size}, "
        f"using [optimum-admm](https://github.com/optimum-admm/optimum-admm) {__version__}. It is an ordinary "
        f"`{getattr(model_config, 'model_type', 'transformers')}` checkpoint: no custom code, no masks.",
        "## Shape",
        _table(_shape_rows(metadata), ("dimension", "source → sheared")),
        "## Training",
        _table(
            [
                ("pruning steps", str(training.get("steps", "?"))),
                ("tokens seen", f"{training['tokens_seen']:,}" if training.get("tokens_seen") else "?"),
                ("expected shape at the end", json.dumps(gates.get("final_expected_shape", {}))),
            ],
            ("", ""),
        ),
        "Sheared-LLaMA (Xia et al. 2023, https://arxiv.org/abs/2310.06694) learns hard-concrete masks over layers, "
        "heads, FFN channels and hidden channels, pushed to the target shape by Lagrange multipliers, then slices "
        "the weights. The paper continues training the sheared model afterwards; this checkpoint is the result of "
        "the pruning phase" + (" only." if len(metadata.get("lineage") or []) < 2 else " and what the lineage says."),
    ]
    if gates.get("far_from_target"):
        parts.append(
            "**Warning**: the gates ended far from the target in "
            + ", ".join(
                f"`{k}` (expected {v['expected']} vs {v['target']})" for k, v in gates["far_from_target"].items()
            )
            + "; the final top-k gave the exact shape, but not the learnt one. Train longer."
        )
    if evaluation:
        rows = [(k, f"{e['perplexity']:.4f}") for k, e in evaluation.items() if "perplexity" in e]
        parts += ["## Evaluation", _table(rows, ("dataset", "perplexity"))]
    parts += [
        "## Usage",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n```',
        "The recipe is in `shearing_config.json`, the trained gates in `shearing_state.safetensors`, and everything "
        "above in `pruning_config.json`.",
        "## Versions",
        _table([(f"`{k}`", f"`{v}`") for k, v in (metadata.get("versions") or {}).items()], ("package", "version")),
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n"
    return ModelCard(content)


def write_sheared(
    directory: str | os.PathLike,
    model: Any,
    shearing: Any,
    metadata: dict[str, Any],
    *,
    tokenizer: Any = None,
    use_cache: bool | None = True,
    model_card: bool = True,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    location: str | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write every file of a sheared model into ``directory`` (a staging directory or the Trainer's output)."""
    from ..export import write_pruning_files
    from ..inspection import config_section

    directory = Path(directory)
    far = metadata["gates"].get("far_from_target")
    if far:
        logger.warning(
            "Sheared-LLaMA: the expected shape ended far from the target (%s); the final top-k gives the exact "
            "target shape, but not the one the gates learnt: train for more steps",
            ", ".join(f"{k} {v['expected']:g} vs {v['target']}" for k, v in far.items()),
        )
    config = model.config
    config.use_cache = use_cache  # the Trainer turns the cache off for training; inference wants the source's
    config.pruning = config_section(METHOD, metadata["sparsity"] or 0.0, "structured")
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    shearing.save(directory)
    write_pruning_files(directory, None, None, metadata=metadata)  # type: ignore[arg-type]
    if model_card:
        card = build_sheared_card(
            metadata,
            base_model=base_model,
            license=license,
            repo_id=repo_id,
            location=location or os.fspath(directory),
            model_config=config,
        )
        card.save(directory / "README.md")
