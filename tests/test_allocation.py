"""Non-uniform sparsity (an explicit map, OWL) for every method, with the model's total kept exact."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from optimum_admm import ADMMConfig, ADMMPruner, MagnitudeConfig, SparseGPTConfig, WandaConfig, errors
from optimum_admm.allocation import allocate, outlier_ratio, owl_sparsities

FAST = {"num_samples": 4, "sequence_length": 32, "seed": 1}
METHODS = [ADMMConfig, SparseGPTConfig, WandaConfig]


def zeros_over_targets(report) -> float:
    total = sum(r.shape[0] * r.shape[1] for r in report.layers)
    return sum(r.sparsity * r.shape[0] * r.shape[1] for r in report.layers) / total


def test_allocate_keeps_the_total_and_the_mapped_layers():
    sizes = {"a": 100, "b": 200, "c": 700}
    out = allocate(sizes, 0.6, base={"a": 0.5, "b": 0.7, "c": 0.6}, fixed={"a": 0.3})
    assert out["a"] == 0.3 and out["b"] - out["c"] == pytest.approx(0.1)  # the free layers keep their spread
    assert sum(out[n] * sizes[n] for n in sizes) == pytest.approx(0.6 * 1000)
    with pytest.raises(errors.InvalidArgumentError, match="sparsity_map=.*leaves b at sparsity"):
        allocate({"a": 900, "b": 100}, 0.6, fixed={"a": 0.0})


def test_owl_gives_blocks_with_more_outliers_less_sparsity():
    ratios = [0.01, 0.05, 0.02]
    out = owl_sparsities(ratios, 0.7, 0.08)
    assert out[1] < out[2] < out[0] and max(out) - min(out) == pytest.approx(0.16)
    assert sum(out) / 3 == pytest.approx(0.7)
    w = torch.ones(4, 8)
    w[0, 0] = 100.0
    assert outlier_ratio([w], [torch.ones(8)], m=5) == pytest.approx(1 / 32)


@pytest.mark.parametrize("config_class", [*METHODS, MagnitudeConfig], ids=lambda c: c.method)
def test_a_sparsity_map_holds_its_layers_and_the_total(config_class, tokenizer, corpus_text):
    model = build_tiny_model("llama")
    extra = {} if config_class is MagnitudeConfig else FAST
    config = config_class(
        sparsity=0.6, sparsity_map={"down_proj": 0.3, "re:.*\\.0\\.self_attn\\.q_proj": 0.8}, **extra
    )
    report = ADMMPruner(model=model, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    rows = {row.name: row for row in report.layers}
    assert all(rows[n].sparsity == pytest.approx(0.3, abs=0.01) for n in rows if n.endswith("down_proj"))
    assert rows["model.layers.0.self_attn.q_proj"].sparsity == pytest.approx(0.8, abs=1 / 32)  # whole weights per row
    assert zeros_over_targets(report) == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("config_class", METHODS, ids=lambda c: c.method)
def test_owl_varies_the_blocks_and_keeps_the_total(config_class, tokenizer, corpus_text):
    model = build_tiny_model("gemma3-sliding")
    config = config_class(sparsity=0.7, sparsity_profile="owl", owl_lambda=0.1, **FAST)
    report = ADMMPruner(model=model, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    per_block = {}
    for row in report.layers:
        per_block.setdefault(row.name.split(".")[2], []).append(row.sparsity)
    means = [sum(v) / len(v) for v in per_block.values()]
    assert max(means) - min(means) == pytest.approx(0.2, abs=0.02)  # spans 2 x owl_lambda
    assert zeros_over_targets(report) == pytest.approx(0.7, abs=1 / 32)  # Wanda: whole weights per row of 32


def test_owl_and_a_map_are_refused_where_they_cannot_apply(tokenizer, corpus_text):
    with pytest.raises(errors.InvalidArgumentError, match="mask_structure='2:4' is invalid"):
        WandaConfig(mask_structure="2:4", sparsity_profile="owl")
    with pytest.raises(errors.InvalidArgumentError, match="sparsity_profile='wide' is unknown"):
        WandaConfig(sparsity_profile="wide")
    with pytest.raises(errors.InvalidArgumentError, match="sparsity_map=.*invalid"):
        WandaConfig(sparsity_map={"q_proj": 1.5})
    model = build_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = ADMMPruner(model=model, tokenizer=tokenizer, config=MagnitudeConfig(sparsity_profile="owl"))
    with pytest.raises(errors.InvalidArgumentError, match="sparsity_profile='owl' is invalid for method 'magnitude'"):
        pruner.prune(show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
