"""ADMM on synthetic layers: invariants, and error below mask-only baselines on correlated inputs with outliers."""

from __future__ import annotations

import pytest
import torch

from optimum_admm.algorithms.admm import admm_prune
from optimum_admm.masks import is_valid_nm, nm_mask, num_pruned, unstructured_mask
from optimum_admm.stats import relative_reconstruction_error


def synthetic_layer(seed: int = 0, tokens: int = 2048, in_features: int = 64, out_features: int = 48):
    """Correlated inputs (a random mixing of a few latent factors plus noise) with a few outlier channels."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 16, generator=generator)
    mixing = torch.randn(16, in_features, generator=generator)
    x = latent @ mixing + 0.3 * torch.randn(tokens, in_features, generator=generator)
    x[:, :4] *= 20.0  # outlier channels
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    return weight, x.T @ x


def masked_error(weight, gram, keep):
    return relative_reconstruction_error(weight, weight * keep, gram)


@pytest.mark.parametrize("structure", [0.5, 0.6, 0.7, 0.8, "2:4"])
def test_admm_beats_magnitude_and_wanda_masks(structure):
    weight, gram = synthetic_layer()
    norms = gram.diagonal().sqrt()
    if structure == "2:4":
        sparsity, nm = 0.5, (2, 4)
        magnitude = nm_mask(weight.abs(), 2, 4)
        wanda = nm_mask(weight.abs() * norms, 2, 4)
    else:
        sparsity, nm = structure, None
        magnitude = unstructured_mask(weight.abs(), sparsity)
        wanda = unstructured_mask(weight.abs() * norms, sparsity, per_output=True)
    pruned = admm_prune(weight, gram, sparsity=sparsity, nm=nm)
    admm_error = relative_reconstruction_error(weight, pruned, gram)
    assert admm_error < masked_error(weight, gram, wanda) < masked_error(weight, gram, magnitude)
    # the weight update is what wins: ADMM's own mask without its update is worse than ADMM
    assert admm_error < masked_error(weight, gram, pruned != 0)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("per_output", [False, True])
@pytest.mark.parametrize("schedule", ["cubic", "constant"])
def test_exact_unstructured_sparsity(sparsity, per_output, schedule):
    weight, gram = synthetic_layer(seed=1, in_features=40, out_features=24)
    pruned = admm_prune(weight, gram, sparsity=sparsity, per_output=per_output, schedule=schedule)
    zeros = pruned == 0
    if per_output:
        assert (zeros.sum(dim=1) == num_pruned(40, sparsity)).all()
    else:
        assert int(zeros.sum()) == num_pruned(weight.numel(), sparsity)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_patterns_are_valid(nm):
    weight, gram = synthetic_layer(seed=2)
    pruned = admm_prune(weight, gram, sparsity=1 - nm[0] / nm[1], nm=nm)
    assert is_valid_nm(pruned, *nm)
    assert int((pruned == 0).sum()) == num_pruned(weight.numel(), 1 - nm[0] / nm[1])


def test_schedule_is_honoured():
    # Which schedule wins depends on the layer (on this one "constant" does); both must reach the target.
    weight, gram = synthetic_layer(seed=3)
    cubic = admm_prune(weight, gram, 0.7, schedule="cubic")
    constant = admm_prune(weight, gram, 0.7, schedule="constant")
    assert not torch.equal(cubic, constant)
    assert int((cubic == 0).sum()) == int((constant == 0).sum()) == num_pruned(weight.numel(), 0.7)


def test_zero_sparsity_is_the_identity():
    weight, gram = synthetic_layer()
    assert torch.equal(admm_prune(weight, gram, sparsity=0.0), weight)


def test_dead_input_channels_are_zeroed():
    weight, gram = synthetic_layer(seed=4)
    gram[5, :] = 0
    gram[:, 5] = 0
    pruned = admm_prune(weight, gram, sparsity=0.5)
    assert (pruned[:, 5] == 0).all()
    assert torch.isfinite(pruned).all()


def test_dtype_and_device_are_kept_and_maths_is_fp32():
    weight, gram = synthetic_layer(seed=5)
    pruned = admm_prune(weight.to(torch.bfloat16), gram, sparsity=0.5)
    assert pruned.dtype == torch.bfloat16 and pruned.shape == weight.shape
    reference = admm_prune(weight.to(torch.bfloat16).float(), gram, sparsity=0.5)
    assert torch.equal(pruned, reference.to(torch.bfloat16))


def test_deterministic():
    weight, gram = synthetic_layer(seed=6)
    assert torch.equal(admm_prune(weight, gram, 0.6), admm_prune(weight, gram, 0.6))


def test_cholesky_inverse_jitters_a_copy_when_not_positive_definite():
    """The jitter goes onto a copy: the caller's matrix is left as it was, and the user is told."""
    from optimum_admm.algorithms.admm import _cholesky_inverse

    matrix = torch.eye(4)
    matrix[0, 0] = -1e-4
    before = matrix.clone()
    with pytest.warns(UserWarning, match="not positive definite"):
        inverse = _cholesky_inverse(matrix)
    assert torch.equal(matrix, before)
    assert bool(torch.isfinite(inverse).all()) and float(inverse[1, 1]) == pytest.approx(1.0, rel=1e-2)
