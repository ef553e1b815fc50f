"""SparseGPT, Wanda and magnitude: hand computations, a direct OBS reference, error ordering, one driver for all."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from test_admm import synthetic_layer

from optimum_admm import ADMMConfig, ADMMPruner, MagnitudeConfig, SparseGPTConfig, WandaConfig
from optimum_admm.algorithms import admm_prune, magnitude_prune, sparsegpt_prune, wanda_prune
from optimum_admm.masks import is_valid_nm, num_pruned
from optimum_admm.registry import config_class_for, registered_methods
from optimum_admm.stats import relative_reconstruction_error


def test_magnitude_by_hand():
    w = torch.tensor([[0.5, -4.0, 1.0, 3.0, -0.1, 2.0, -6.0, 0.2]])
    assert magnitude_prune(w, 0.5).tolist() == [[0.0, -4.0, 0.0, 3.0, 0.0, 2.0, -6.0, 0.0]]
    assert magnitude_prune(w, 0.5, nm=(2, 4)).tolist() == [[0.0, -4.0, 0.0, 3.0, 0.0, 2.0, -6.0, 0.0]]
    assert magnitude_prune(w, 0.75).tolist() == [[0.0, -4.0, 0.0, 0.0, 0.0, 0.0, -6.0, 0.0]]


def test_wanda_by_hand():
    # scores |W| * ||X_j||: [1*1, 2*1, 1*3, 4*0.5, 1*2, 1*0.1, 3*1, 2*2] = [1, 2, 3, 2, 2, 0.1, 3, 4]
    w = torch.tensor([[1.0, -2.0, 1.0, 4.0, -1.0, 1.0, 3.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    gram = torch.diag(torch.tensor([1.0, 1.0, 9.0, 0.25, 4.0, 0.01, 1.0, 4.0]))
    pruned = wanda_prune(w, gram, 0.5)
    # row 0 prunes 0.1, 1 and the first two 2s (index order breaks the tie): columns 5, 0, 1, 3
    assert (pruned[0] != 0).int().tolist() == [0, 0, 1, 0, 1, 0, 1, 1]
    # row 1 scores are the norms [1, 1, 3, .5, 2, .1, 1, 2]: prunes columns 5, 3, 0, 1
    assert (pruned[1] != 0).int().tolist() == [0, 0, 1, 0, 1, 0, 1, 1]
    two_four = wanda_prune(w, gram, 0.5, nm=(2, 4))
    # groups [1, 2, 3, 2] and [2, 0.1, 3, 4]: the tie between the 2s prunes the lower index
    assert (two_four[0] != 0).int().tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def direct_obs(weight: torch.Tensor, hessian: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """Textbook OBS sweep: for each column in order, prune it and update the later columns with the inverse of the
    Hessian restricted to the columns not yet processed, recomputed directly."""
    w = weight.double().clone()
    h = hessian.double()
    for j in range(w.shape[1]):
        h_inv = torch.linalg.inv(h[j:, j:])
        q = w[:, j].masked_fill(prune[:, j], 0.0)
        error = (w[:, j] - q) / h_inv[0, 0]
        w[:, j:] -= error[:, None] * h_inv[0][None, :]
        w[:, j] = q
    return w.float()


def test_sparsegpt_matches_a_direct_obs_sweep():
    weight, gram = synthetic_layer(seed=7, in_features=24, out_features=8)
    damped = gram.clone()
    damped.diagonal().add_(0.01 * float(gram.diagonal().mean()))
    pruned = sparsegpt_prune(weight, gram, 0.5, block_size=24)
    # with one block the mask is chosen up front by w^2 / [(H_{j:, j:})^-1]_00^2 (what U_jj^2 equals)
    u_diag = torch.stack([torch.linalg.inv(damped[j:, j:].double())[0, 0].sqrt() for j in range(24)]).float()
    scores = weight.square() / u_diag.square()
    prune = torch.zeros_like(weight, dtype=torch.bool)
    prune.view(-1)[scores.view(-1).argsort()[: num_pruned(weight.numel(), 0.5)]] = True
    reference = direct_obs(weight, damped, prune)
    assert torch.equal(pruned == 0, prune)
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-5)


def test_sparsegpt_lazy_blocks_equal_one_block_for_a_fixed_nm_mask_order():
    weight, gram = synthetic_layer(seed=8, in_features=32, out_features=8)
    small = sparsegpt_prune(weight, gram, 0.5, nm=(2, 4), block_size=4)
    large = sparsegpt_prune(weight, gram, 0.5, nm=(2, 4), block_size=32)
    # N:M masks are chosen every M columns on the current weights, so the block size changes nothing but rounding
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-5)
    assert is_valid_nm(small, 2, 4)


@pytest.mark.parametrize("structure", [0.6, "2:4"])
def test_error_orders_admm_sparsegpt_wanda_magnitude(structure):
    weight, gram = synthetic_layer(seed=0)
    sparsity, nm = (0.5, (2, 4)) if structure == "2:4" else (structure, None)
    errors = [
        relative_reconstruction_error(weight, pruned, gram)
        for pruned in (
            admm_prune(weight, gram, sparsity, nm=nm),
            sparsegpt_prune(weight, gram, sparsity, nm=nm),
            wanda_prune(weight, gram, sparsity, nm=nm),
            magnitude_prune(weight, sparsity, nm=nm),
        )
    ]
    assert errors == sorted(errors), errors


def test_registry_knows_every_method():
    assert set(registered_methods()) == {"admm", "sparsegpt", "wanda", "magnitude"}
    assert config_class_for("wanda") is WandaConfig


def test_sparsegpt_config_checks_block_size_against_m():
    with pytest.raises(ValueError, match="block_size=6 .* multiple of M=4"):
        SparseGPTConfig(mask_structure="2:4", block_size=6)
    with pytest.raises(ValueError, match="dampening=0"):
        SparseGPTConfig(dampening=0)


@pytest.mark.parametrize("config_cls", [ADMMConfig, SparseGPTConfig, WandaConfig, MagnitudeConfig])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_method_through_the_same_driver(config_cls, family, tokenizer, corpus_text):
    model = build_tiny_model(family)
    config = config_cls(sparsity=0.5, num_samples=4, sequence_length=32)
    report = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=config).prune(
        calibration_dataset=[corpus_text], show_progress=False
    )
    assert report.method == config.method
    assert report.sparsity == pytest.approx(0.5)
    assert all(row.sparsity == pytest.approx(0.5) for row in report.layers)
    assert (row.relative_error is None for row in report.layers) if config_cls is MagnitudeConfig else True


def test_magnitude_reads_no_calibration_data(tokenizer):
    model = build_tiny_model("qwen2")
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    report = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=MagnitudeConfig(sparsity=0.6)).prune(
        show_progress=False
    )
    assert calls == [] and report.calibration == {}
    assert report.sparsity == pytest.approx(0.6, abs=1e-3)
    assert all(row.relative_error is None for row in report.layers)


def _mask_only_configs():
    return [
        WandaConfig(sparsity=0.5),
        WandaConfig(sparsity=0.6, per_output=False),
        WandaConfig(mask_structure="2:4"),
        MagnitudeConfig(sparsity=0.7),
        MagnitudeConfig(sparsity=0.5, per_output=True),
        MagnitudeConfig(mask_structure="4:8"),
    ]


@pytest.mark.parametrize("config", _mask_only_configs(), ids=lambda c: f"{c.method}-{c.sparsity}-{c.mask_structure}")
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_mask_only_methods_zero_weights_in_place_exactly_as_their_functions(config, layout):
    from transformers.pytorch_utils import Conv1D

    from optimum_admm.modeling import get_weight_matrix
    from optimum_admm.registry import get_mask_method, get_method, get_spec
    from optimum_admm.sequential import _prune_layer
    from optimum_admm.stats import GramAccumulator

    torch.manual_seed(0)
    out_features, in_features = 300, 1000  # 262 rows per chunk of 2^18 elements: the in-place fill runs in 2 chunks
    module = (
        torch.nn.Linear(in_features, out_features, bias=False)
        if layout == "linear"
        else Conv1D(out_features, in_features)
    )
    torch.nn.init.normal_(module.weight)
    x = torch.randn(64, in_features) * torch.linspace(0.1, 3.0, in_features)
    accumulator = GramAccumulator(in_features)
    accumulator.add(x)
    gram = accumulator.gram
    dense = get_weight_matrix(module).clone()
    expected = get_method(config)(dense.clone(), gram, config)
    assert get_mask_method(config) is not None
    storage = module.weight.data_ptr()
    row = _prune_layer("layer", module, accumulator, config, get_spec(config))
    assert module.weight.data_ptr() == storage  # zeroed in place, no new tensor
    assert torch.equal(get_weight_matrix(module), expected)
    assert row.sparsity == pytest.approx(1 - float(torch.count_nonzero(expected)) / expected.numel())
    assert row.relative_error == pytest.approx(relative_reconstruction_error(dense, expected, gram), rel=1e-4)


def test_masked_reconstruction_error_equals_the_error_of_the_masked_copy():
    from optimum_admm.stats import masked_reconstruction_error

    weight, gram = synthetic_layer(seed=3, in_features=64, out_features=5000)  # several row chunks
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.4
    expected = relative_reconstruction_error(weight, weight.masked_fill(~keep, 0), gram)
    assert masked_reconstruction_error(weight, keep, gram) == pytest.approx(expected, rel=1e-5)
    assert masked_reconstruction_error(weight, torch.ones_like(keep), gram) == 0.0


def test_methods_that_update_weights_have_no_mask_function():
    from optimum_admm.registry import get_mask_method

    assert get_mask_method(ADMMConfig()) is None and get_mask_method(SparseGPTConfig()) is None
    assert get_mask_method(WandaConfig()) is not None and get_mask_method(MagnitudeConfig()) is not None


def test_a_registered_mask_function_is_what_the_driver_calls(monkeypatch, tokenizer):
    from dataclasses import dataclass
    from typing import ClassVar

    from optimum_admm import configuration, registry

    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    monkeypatch.setattr(configuration, "_CONFIG_CLASSES", dict(configuration._CONFIG_CLASSES))

    @dataclass
    class EveryOtherConfig(MagnitudeConfig):
        method: ClassVar[str] = "every-other"

    def refuse(weight, gram, config):
        raise AssertionError("the driver built a pruned copy for a method with a mask function")

    def every_other(weight, gram, config):
        keep = torch.zeros(weight.shape, dtype=torch.bool)
        keep[:, ::2] = True
        return keep

    with pytest.raises(ValueError, match="mask_fn=3 is invalid"):
        registry.register_method(EveryOtherConfig, refuse, mask_fn=3, statistic=None)
    registry.register_method(EveryOtherConfig, refuse, mask_fn=every_other, statistic=None)
    model = build_tiny_model("llama")
    report = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=EveryOtherConfig()).prune(
        show_progress=False
    )
    assert report.sparsity == pytest.approx(0.5)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert torch.count_nonzero(weight[:, 1::2]) == 0 and torch.count_nonzero(weight[:, ::2]) == weight[:, ::2].numel()
    with pytest.raises(ValueError, match="method 'every-other' is registered already"):
        registry.register_method(EveryOtherConfig, every_other, statistic=None)  # a name is registered once
