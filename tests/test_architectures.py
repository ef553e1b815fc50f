"""Every causal-LM model type of the installed transformers prunes or is refused before any work: never a silent
partial prune. The outcomes are committed in ``tests/architectures_expected.json`` (written by
``benchmarks/architectures.py``), so a regression fails.

The default suite runs every MoE and hybrid type and a third of the others; ``OPTIMUM_ADMM_FULL_SWEEP=1`` (set by CI)
runs every type.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from architecture_sweep import causal_lm_types, sweep_one

EXPECTED = json.loads((Path(__file__).parent / "architectures_expected.json").read_text())
#: Types the issue names, and every MoE and hybrid kind: always in the default suite.
ALWAYS = {
    "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "olmoe", "falcon", "jamba", "mamba",
    "gemma4_text", "deepseek_v4", "qwen3_next", "bamba", "zamba", "zamba2", "nemotron_h", "granitemoehybrid",
    "llama4_text", "jetmoe", "bert", "gemma3", "blenderbot-small", "phimoe", "minimax", "glm4_moe", "hrm_text",
    "llava (image-text-to-text)", "gemma3 (image-text-to-text)", "mistral3 (image-text-to-text)",
}  # fmt: skip
FULL = os.environ.get("OPTIMUM_ADMM_FULL_SWEEP") == "1"
TYPES = [t for i, t in enumerate(causal_lm_types()) if FULL or t in ALWAYS or i % 3 == 0]


@pytest.mark.parametrize("model_type", TYPES)
def test_every_causal_lm_type_prunes_or_is_refused_before_any_work(model_type):
    outcome = sweep_one(model_type, "wanda")
    assert outcome.outcome not in ("partial", "crashed"), outcome
    if outcome.outcome == "pruned":
        assert outcome.pruned_fraction >= 0.95, outcome
    if outcome.outcome == "refused":
        assert outcome.detail and "\n" not in outcome.detail, outcome
    expected = EXPECTED.get(model_type)
    if expected is not None:  # a type new to this transformers only has to prune or be refused
        assert outcome.outcome == expected, f"{model_type}: {outcome} (expected {expected})"


def test_a_llava_style_model_prunes_its_language_decoder_from_text_and_leaves_the_vision_tower_alone():
    import torch
    from tiny_configs import build

    from optimum_admm import WandaConfig
    from optimum_admm.sequential import prune_model

    model = build("llava", task="image-text-to-text")
    vision = {n: p.clone() for n, p in model.named_parameters() if "vision_tower" in n or "projector" in n}
    batches = [torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    report = prune_model(model, WandaConfig(), batches, show_progress=False)
    assert vision and all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in vision.items())
    assert report.layers and all(row.name.startswith("model.language_model.layers.") for row in report.layers)
    assert report.sparsity == pytest.approx(0.5)


def test_the_committed_outcomes_cover_the_installed_transformers():
    missing = sorted(set(causal_lm_types()) - set(EXPECTED))
    assert len(missing) <= 0.1 * len(EXPECTED), f"regenerate with benchmarks/architectures.py: {missing[:10]}"
    counts = {outcome: list(EXPECTED.values()).count(outcome) for outcome in set(EXPECTED.values())}
    assert counts.get("partial", 0) == 0 and counts.get("crashed", 0) == 0, counts


@pytest.mark.parametrize(
    "model_type", ["mixtral", "gemma4_text", "deepseek_v4", "jamba", "mamba", "falcon", "llava (image-text-to-text)"]
)
def test_admm_prunes_the_named_families_too(model_type):
    outcome = sweep_one(model_type, "admm")
    assert outcome.outcome == "pruned" and outcome.pruned_fraction >= 0.95, outcome
