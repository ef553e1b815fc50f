"""Mask functions against hand-computed masks, and the cubic schedule values."""

from __future__ import annotations

import pytest
import torch

from optimum_admm.masks import (
    cubic_sparsity,
    gradual_nm_mask,
    is_valid_nm,
    nm_mask,
    num_pruned,
    scheduled_sparsity,
    select_mask,
    unstructured_mask,
)

SCORES = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 8.0, 7.0, 6.0]])


def test_unstructured_per_layer_by_hand():
    # the four smallest of the layer: 0.5, 1, 2, 3
    assert unstructured_mask(SCORES, 0.5).int().tolist() == [[1, 0, 0, 0], [0, 1, 1, 1]]
    # floor(8 * 0.3) = 2 smallest: 0.5 and 1
    assert unstructured_mask(SCORES, 0.3).int().tolist() == [[1, 0, 1, 1], [0, 1, 1, 1]]


def test_unstructured_per_row_by_hand():
    assert unstructured_mask(SCORES, 0.5, per_output=True).int().tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]
    assert unstructured_mask(SCORES, 0.75, per_output=True).int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]


def test_ties_are_broken_by_lower_index_first():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 2.0]])
    assert unstructured_mask(scores, 0.5).int().tolist() == [[0, 0, 0, 1, 1, 1]]
    assert nm_mask(torch.ones(1, 4), 2, 4).int().tolist() == [[0, 0, 1, 1]]


def test_two_four_by_hand():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 5.0, 0.0, 6.0, 7.0], [9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 4.0, 3.0]])
    assert nm_mask(scores, 2, 4).int().tolist() == [[0, 1, 1, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 1, 1]]


def test_four_eight_by_hand():
    scores = torch.tensor([[8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0]])
    assert nm_mask(scores, 4, 8).int().tolist() == [[1, 0, 1, 0, 1, 0, 1, 0]]


def test_nm_needs_divisible_inputs():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_cubic_schedule_values():
    values = [cubic_sparsity(0.5, t, 15) for t in range(15)]
    assert values[0] == pytest.approx(0.5 - 0.5 * (14 / 15) ** 3)
    assert round(values[0], 3) == 0.093 and round(values[1], 3) == 0.175
    assert values[-1] == 0.5
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert [scheduled_sparsity(0.5, t, 15, "constant") for t in (0, 7, 14)] == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="schedule='linear'"):
        scheduled_sparsity(0.5, 0, 15, "linear")


def test_gradual_nm_protects_top_n_and_ends_valid():
    torch.manual_seed(0)
    scores = torch.rand(16, 32)
    protected = nm_mask(scores, 2, 4)
    for s in (0.1, 0.3, 0.45):
        mask = gradual_nm_mask(scores, 2, 4, s)
        assert bool(mask[protected].all())
        assert int((~mask).sum()) == num_pruned(scores.numel(), s)
    assert torch.equal(gradual_nm_mask(scores, 2, 4, 0.5), protected)
    assert torch.equal(select_mask(scores, 0.5, nm=(2, 4)), protected)


def test_num_pruned_is_robust_to_round_off():
    assert num_pruned(8, 0.75) == 6
    assert num_pruned(10, 0.7) == 7
    assert num_pruned(3, 0.5) == 1


def test_is_valid_nm():
    assert is_valid_nm(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4)
    assert not is_valid_nm(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2, 4)


def _argsort_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The plain stable-argsort N:M selection, written out as the reference for the rank-comparison one."""
    groups = scores.reshape(scores.shape[0], -1, m)
    order = torch.argsort(groups, dim=-1, stable=True)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : m - n], False)
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2), (8, 16)])
@pytest.mark.parametrize("quantised", [False, True])
def test_nm_mask_equals_a_stable_argsort(n, m, quantised):
    generator = torch.Generator().manual_seed(n * 100 + m)
    scores = torch.randn(700, 64, generator=generator).abs()  # 700 x 64 > 4 chunks of rows: the chunked path too
    if quantised:
        scores = (scores * 2).round()  # many exact ties inside groups
    assert torch.equal(nm_mask(scores, n, m), _argsort_nm(scores, n, m))


@pytest.mark.parametrize("kind", ["normal", "ties", "skewed", "infinite"])
@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.6, 0.97])
def test_layer_selection_equals_kthvalue_on_large_layers(kind, fraction):
    """The sampled bracket in the layer-wide selection gives the exact k-th value, including when it misses."""
    generator = torch.Generator().manual_seed(7)
    scores = torch.randn(512, 1024, generator=generator).abs()
    if kind == "ties":
        scores = (scores * 4).round()
    elif kind == "skewed":  # 90% zeros: the bracket collapses onto one value
        scores[torch.rand(scores.shape, generator=generator) < 0.9] = 0.0
    elif kind == "infinite":  # what gradual N:M hands over: protected entries at +inf
        scores[:, ::2] = float("inf")
        fraction = fraction / 2
    k = num_pruned(scores.numel(), fraction)
    keep = unstructured_mask(scores, fraction)
    assert int((~keep).sum()) == k
    threshold = scores.reshape(-1).kthvalue(k).values
    assert bool((scores[~keep] <= threshold).all()) and bool((scores[keep] >= threshold).all())
    at_threshold = (scores.reshape(-1) == threshold).nonzero().squeeze(1)
    pruned_ties = at_threshold[~keep.reshape(-1)[at_threshold]]
    kept_ties = at_threshold[keep.reshape(-1)[at_threshold]]
    if len(pruned_ties) and len(kept_ties):  # ties at the threshold: the lower indices are pruned first
        assert int(pruned_ties.max()) < int(kept_ties.min())


def _where_gradual(scores: torch.Tensor, n: int, m: int, sparsity: float) -> torch.Tensor:
    """Gradual N:M written out with ``torch.where``: the protected top-n at +inf, the k smallest of the rest pruned."""
    protected = _argsort_nm(scores, n, m)
    k = min(num_pruned(scores.numel(), sparsity), int((~protected).sum()))
    candidates = torch.where(protected, float("inf"), scores).reshape(-1)
    order = torch.argsort(candidates, stable=True)  # ties: lower index first
    keep = torch.ones_like(candidates, dtype=torch.bool)
    keep[order[:k]] = False
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2)])
@pytest.mark.parametrize("kind", ["normal", "ties", "negative", "huge", "nonfinite"])
@pytest.mark.parametrize("sparsity", [0.05, 0.3, 0.45])
def test_gradual_nm_equals_the_where_formulation(n, m, kind, sparsity):
    """The protected entries are lifted to +inf by adds, not ``where``: same mask for any scores, large layers too."""
    generator = torch.Generator().manual_seed(n * 10 + m)
    scores = torch.randn(384, 512, generator=generator)  # past the sampled bracket's size: that path too
    if kind == "ties":
        scores = (scores * 2).round().abs()
    elif kind == "huge":  # a sum past the float range takes the where path; adds of finfo.max must not misorder
        scores = scores * 3e38
    elif kind == "nonfinite":
        scores[0, :8] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0] * 2)
    elif kind == "normal":
        scores = scores.abs()
    sparsity = min(sparsity, 1 - n / m - 1e-3)
    expected = _where_gradual(scores.nan_to_num(nan=float("inf")) if kind == "nonfinite" else scores, n, m, sparsity)
    got = gradual_nm_mask(scores, n, m, sparsity)
    if kind == "nonfinite":  # NaN has no place in an order; every finite-score entry must agree
        finite = torch.isfinite(scores)
        assert torch.equal(got[finite], expected[finite])
    else:
        assert torch.equal(got, expected)
