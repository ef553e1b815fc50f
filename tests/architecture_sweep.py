"""Prune one tiny model of a transformers model type and say what happened: the sweep behind
``tests/test_architectures.py`` and ``benchmarks/architectures.py``.

Outcomes:

- ``pruned``: at least 95% of the model's prunable parameters (matrices, not embeddings, heads or routers) are at
  the target sparsity and the logits are finite;
- ``refused``: the library raised its own error (one clear line) before changing any weight;
- ``partial``: it pruned, but less than that (a silent partial prune: what must never happen);
- ``not built``: the tiny config does not build or run a forward (a limit of the test's config shrinker, not of
  the library);
- ``crashed``: anything else.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from tiny_configs import build

#: Prunable parameters are matrices outside these: embeddings, the LM head and routers stay dense by design.
EXEMPT = re.compile(
    r"(^|.*\.)(\w*embed\w*|wte|wpe|lm_head|router|gate|shared_expert_gate"
    # multimodal models: the vision and audio towers and their projectors stay dense by default
    r"|vision_tower|vision_model|visual|vision\w*|multi_modal_projector|audio_tower|audio\w*"
    # Gemma 4's per-layer input projection: part of its per-layer embedding, outside the decoder blocks
    r"|per_layer_model_projection)(\..*)?$"
)
TARGET = 0.5
SEQUENCE = 16


@dataclass
class Outcome:
    model_type: str
    outcome: str
    pruned_fraction: float | None = None  # of the prunable parameters, at the target sparsity
    seconds: float = 0.0
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def prunable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The matrices a user expects to be pruned: every parameter with two or more dimensions that is not an
    embedding, the head, a router or tied to one of them."""
    exempt_ids = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = name.rpartition(".")[0]
        if EXEMPT.fullmatch(owner) or EXEMPT.fullmatch(name):
            exempt_ids.add(id(param))
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            exempt_ids.update(id(p) for p in module.parameters())
    from optimum_admm.modeling import language_model

    language = language_model(model)  # a multimodal model: its language model only (towers, projectors stay dense)
    return {
        n: p
        for n, p in model.named_parameters()
        if p.dim() >= 2 and id(p) not in exempt_ids and (language is None or n.startswith(f"{language}."))
    }


#: Suffix of the sweep's names for the image-text-to-text model types (built with AutoModelForImageTextToText).
MULTIMODAL = " (image-text-to-text)"


def sweep_one(model_type: str, method: str = "wanda") -> Outcome:
    """Build, prune (``method`` at 50%) and classify one model type (``"<type> (image-text-to-text)"`` for the
    image-text-to-text model of a type)."""
    from optimum_admm import ADMMConfig, WandaConfig, errors
    from optimum_admm.sequential import prune_model

    start = time.perf_counter()
    try:
        if model_type.endswith(MULTIMODAL):
            model = build(model_type[: -len(MULTIMODAL)], task="image-text-to-text")
        else:
            model = build(model_type)
        vocab = int(model.config.get_text_config().vocab_size)
        ids = torch.randint(0, min(vocab, 100), (1, SEQUENCE), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception as err:  # noqa: BLE001 - a config the shrinker cannot build
        return Outcome(model_type, "not built", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
    weights = prunable(model)
    before = {n: p.detach().clone() for n, p in weights.items()}
    batches = [
        torch.randint(0, min(vocab, 100), (1, SEQUENCE), generator=torch.Generator().manual_seed(s)) for s in range(4)
    ]
    config = (
        ADMMConfig(sparsity=TARGET, iterations=4, mask_iterations=3)
        if method == "admm"
        else WandaConfig(sparsity=TARGET)
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = prune_model(model, config, batches, show_progress=False)
    except errors.OptimumADMMError as err:
        changed = [n for n, p in weights.items() if not torch.equal(p, before[n])]
        seconds = time.perf_counter() - start
        message = str(err).splitlines()[0][:300]
        if changed:
            return Outcome(
                model_type, "crashed", seconds=seconds, detail=f"raised after changing {changed[0]}: {message}"
            )
        return Outcome(model_type, "refused", seconds=seconds, detail=message)
    except Exception as err:  # noqa: BLE001
        detail = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        return Outcome(model_type, "crashed", seconds=time.perf_counter() - start, detail=detail)
    seconds = time.perf_counter() - start
    unused = [f"{name}.weight" for name in report.left_dense]  # never called in a causal forward: named, not counted
    weights = {n: p for n, p in weights.items() if n not in unused}
    total = sum(p.numel() for p in weights.values())
    zeros = sum(int((p == 0).sum()) for p in weights.values())
    fraction = zeros / (TARGET * total) if total else 0.0
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    if not bool(torch.isfinite(logits).all()):
        return Outcome(model_type, "crashed", fraction, seconds, "non-finite logits after pruning")
    dense = sorted(
        (n for n, p in weights.items() if float((p == 0).float().mean()) < 0.4), key=lambda n: -weights[n].numel()
    )
    detail = "" if not dense else "dense: " + ", ".join(dense[:3])
    if unused:
        detail = f"{detail}; unused in a causal forward, left dense with a warning: {', '.join(unused[:2])}".lstrip(
            "; "
        )
    return Outcome(
        model_type, "pruned" if fraction >= 0.95 else "partial", round(min(fraction, 1.0), 3), seconds, detail
    )


def causal_lm_types() -> list[str]:
    """Every causal-LM model type, then every image-text-to-text one (suffixed with :data:`MULTIMODAL`)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + [
        f"{t}{MULTIMODAL}" for t in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    ]
