"""Waste removed from the solve and the driver, each equal to what it replaces: layers that read one input (q/k/v,
gate/up, one expert's gate/up) solved together (one factorisation, stacked rows, each layer's own mask and sparsity),
and calibration samples run through each block in batches."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from optimum_admm import ADMMConfig, ADMMPruner, SparseGPTConfig, sequential
from optimum_admm.algorithms import admm_prune, admm_prune_group, sparsegpt_prune, sparsegpt_prune_group
from optimum_admm.algorithms.admm import _cholesky_inverse
from optimum_admm.masks import scheduled_sparsity, select_mask


def shared_input_layers(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 48, generator=generator) @ torch.randn(48, 48, generator=generator)
    x[:, :3] *= 10.0
    weights = [torch.randn(rows, 48, generator=generator) for rows in (48, 16, 16)]
    return weights, x.T @ x


def paper_admm(w0, g, sparsity, nm=None, iterations=20, mask_iterations=15, rho=1.0, dampening=0.1):
    """The update as the paper writes it (B = H V0 formed explicitly), in float64: what the solver must reproduce."""
    w0, g = w0.double(), g.double()
    d = g.diagonal().sqrt() + 1e-8
    h = g / d[:, None] / d[None, :]
    h += dampening * h.diagonal().mean() * torch.eye(len(d), dtype=h.dtype)
    v0 = (w0 * d).T
    b = h @ v0
    a_inv = _cholesky_inverse(h + rho * torch.eye(len(d), dtype=h.dtype))
    v, u = v0, torch.zeros_like(v0)
    for t in range(iterations):
        if t < mask_iterations:
            keep = select_mask((v + u).abs().T, scheduled_sparsity(sparsity, t, mask_iterations, "cubic"), nm=nm).T
        z = (v + u) * keep
        u = u + v - z
        v = a_inv @ (b + rho * (z - u))
    return ((v + u) * keep).T / d


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_admm_matches_the_paper_update(nm):
    (weight, *_), gram = shared_input_layers()
    sparsity = 0.5 if nm else 0.6
    got = admm_prune(weight, gram, sparsity, nm=nm)
    expected = paper_admm(weight, gram, sparsity, nm=nm)
    assert torch.equal(got == 0, expected == 0)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize(
    ("group_fn", "layer_fn"), [(admm_prune_group, admm_prune), (sparsegpt_prune_group, sparsegpt_prune)]
)
def test_group_solve_equals_one_solve_per_layer(group_fn, layer_fn, nm):
    weights, gram = shared_input_layers()
    sparsities = [0.5] * 3 if nm else [0.6, 0.75, 0.0]  # each layer its own target; 0 leaves it dense
    together = group_fn(weights, gram, sparsities, nm=nm)
    for weight, sparsity, got in zip(weights, sparsities, together, strict=True):
        alone = layer_fn(weight, gram, sparsity, nm=nm)
        assert got.shape == weight.shape and got.dtype == weight.dtype
        assert torch.equal(got == 0, alone == 0)  # each layer's mask chosen over its own rows
        assert torch.allclose(got, alone, rtol=1e-4, atol=1e-5 * float(alone.abs().max()))
        assert float((got == 0).float().mean()) == pytest.approx(sparsity, abs=0.01)
    assert torch.equal(together[2], weights[2]) or nm


def test_group_solve_rejects_mismatched_sparsities():
    weights, gram = shared_input_layers()
    with pytest.raises(ValueError, match="3 weights but 2 sparsities"):
        admm_prune_group(weights, gram, [0.5, 0.5])


@pytest.mark.parametrize(
    "config",
    [
        ADMMConfig(sparsity=0.6, num_samples=8, sequence_length=128),
        SparseGPTConfig(mask_structure="2:4", num_samples=8, sequence_length=128),
    ],
    ids=["admm-0.6", "sparsegpt-2:4"],
)
def test_driver_group_solves_equal_separate_solves(config, tokenizer, corpus_text, monkeypatch):
    calls = []
    real = sequential._solve_group

    def spy(run, names, accumulator):
        calls.append(list(names))
        return real(run, names, accumulator)

    monkeypatch.setattr(sequential, "_solve_group", spy)
    grouped = build_tiny_model("llama")
    report = ADMMPruner(model=grouped, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    assert [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    ] in calls
    assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in calls

    calls.clear()
    monkeypatch.setattr(sequential, "GROUP_SOLVE_ELEMENTS", 0)  # every layer alone
    alone = build_tiny_model("llama")
    separate = ADMMPruner(model=alone, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    assert all(len(names) == 1 for names in calls)
    assert [row.name for row in report.layers] == [row.name for row in separate.layers]
    for (name, a), b in zip(grouped.named_parameters(), alone.parameters(), strict=True):
        assert torch.equal(a == 0, b == 0), name
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
    for row, other in zip(report.layers, separate.layers, strict=True):
        assert row.sparsity == other.sparsity and row.num_tokens == other.num_tokens
        assert row.relative_error == pytest.approx(other.relative_error, rel=1e-3, abs=1e-6)


def _prune_llama(tokenizer, corpus_text, **config):
    model = build_tiny_model("llama")
    config = ADMMConfig(num_samples=8, sequence_length=128, **config)
    report = ADMMPruner(model=model, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    return model, report


def test_batched_calibration_equals_one_sample_at_a_time(tokenizer, corpus_text, monkeypatch):
    shapes = []
    real = sequential._run_block

    def spy(block, inputs, index, device, storage):
        shapes.extend(tuple(h.shape[:1]) for h in inputs.hidden)
        return real(block, inputs, index, device, storage)

    monkeypatch.setattr(sequential, "_run_block", spy)
    batched, report = _prune_llama(tokenizer, corpus_text, calibration_batch_size=3)
    assert set(shapes) == {(3,), (2,)}  # 8 samples: 3 + 3 + 2
    shapes.clear()
    single, single_report = _prune_llama(tokenizer, corpus_text, calibration_batch_size=1)
    assert set(shapes) == {(1,)}
    for (name, a), b in zip(batched.named_parameters(), single.parameters(), strict=True):
        assert torch.equal(a == 0, b == 0), name
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name
    assert [r.num_tokens for r in report.layers] == [r.num_tokens for r in single_report.layers] != []


def test_a_run_resumes_with_another_calibration_batch_size(tokenizer, corpus_text, tmp_path, monkeypatch):
    from conftest import interrupt_at_block

    expected, _ = _prune_llama(tokenizer, corpus_text, calibration_batch_size=1)
    interrupt_at_block(monkeypatch, 1)
    checkpoint = tmp_path / "ckpt"
    model = build_tiny_model("llama")
    config = ADMMConfig(num_samples=8, sequence_length=128, calibration_batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        ADMMPruner(model=model, tokenizer=tokenizer, config=config).prune(
            [corpus_text], show_progress=False, checkpoint_dir=checkpoint
        )
    monkeypatch.undo()
    resumed = build_tiny_model("llama")
    config = ADMMConfig(num_samples=8, sequence_length=128, calibration_batch_size=1)
    ADMMPruner(model=resumed, tokenizer=tokenizer, config=config).prune(
        [corpus_text], show_progress=False, checkpoint_dir=checkpoint
    )
    for (name, a), b in zip(resumed.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(a == 0, b == 0), name
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("family", ["llama", "mixtral"])
@pytest.mark.parametrize("true_sequential", [False, True])
def test_groups_are_found_in_the_statistics_pass_without_a_forward_of_their_own(
    family, true_sequential, tokenizer, corpus_text, monkeypatch
):
    """The grouping pass is the first statistics pass: the groups equal a separate probe forward's, and a block runs
    its batches once per stage for statistics and once to feed the next block (the last block: statistics only)."""
    from conftest import VOCAB_SIZE
    from tiny_configs import build

    passes, found = [], []
    real_run, real_accumulate = sequential._run_block, sequential._accumulate

    def run_spy(block, inputs, index, device, storage):
        passes.append(index)
        return real_run(block, inputs, index, device, storage)

    def accumulate_spy(run, block, layers, groups, inputs, index, device, *args, **kwargs):
        if groups is None:
            probe = sequential._share_groups(block, layers, inputs, index, device, run.experts[index])
            passes.pop()  # the probe's own pass is the test's, not the driver's
            result = real_accumulate(run, block, layers, groups, inputs, index, device, *args, **kwargs)
            found.append((probe, result[0]))
            return result
        return real_accumulate(run, block, layers, groups, inputs, index, device, *args, **kwargs)

    monkeypatch.setattr(sequential, "_run_block", run_spy)
    monkeypatch.setattr(sequential, "_accumulate", accumulate_spy)
    model = build_tiny_model("llama") if family == "llama" else build(family, seed=0, vocab_size=VOCAB_SIZE)
    config = ADMMConfig(num_samples=4, sequence_length=32, iterations=4, mask_iterations=3,
                        true_sequential=true_sequential, calibration_batch_size=2)  # fmt: skip
    ADMMPruner(model=model, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    blocks = len(sequential.find_decoder_blocks(model)[1])
    assert len(found) == blocks
    for probe, groups in found:
        assert groups == probe and any(len(group) > 1 for group in groups)
    stages = [len(groups) if true_sequential else 1 for _, groups in found]
    assert [passes.count(i) for i in range(blocks)] == [s + (i + 1 < blocks) for i, s in enumerate(stages)]
