"""Hard-concrete statistics, exact top-k masks, the Lagrangian's sign convention, the masked norm, one draw per forward."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_model

from optimum_admm.structured import ShearingConfig, ShearingModule, final_gates, topk_keep
from optimum_admm.structured.hard_concrete import prob_nonzero, prob_one, sample_hard_concrete
from optimum_admm.structured.lagrangian import expected_sparsity, warmup_target
from optimum_admm.structured.training import shearing_param_groups

CONSTANTS = {"temperature": 2 / 3, "limit_left": -0.1, "limit_right": 1.1}


def test_hard_concrete_matches_closed_forms():
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 1.5, 4.6])
    draws = 200_000
    z = sample_hard_concrete(
        log_alpha[:, None].expand(-1, draws), generator=torch.Generator().manual_seed(0), **CONSTANTS
    )
    p_zero, p_one = (z == 0).float().mean(1), (z == 1).float().mean(1)
    torch.testing.assert_close(p_zero, 1 - prob_nonzero(log_alpha, **CONSTANTS), atol=4e-3, rtol=0)
    torch.testing.assert_close(p_one, prob_one(log_alpha, **CONSTANTS), atol=4e-3, rtol=0)
    # The closed forms of the spec: sigmoid(a + beta ln 11) and sigmoid(a - beta ln 11).
    beta_ln11 = 2 / 3 * math.log(11)
    torch.testing.assert_close(prob_nonzero(log_alpha, **CONSTANTS), torch.sigmoid(log_alpha + beta_ln11))
    torch.testing.assert_close(prob_one(log_alpha, **CONSTANTS), torch.sigmoid(log_alpha - beta_ln11))


def test_sample_is_differentiable_and_in_unit_interval():
    log_alpha = torch.zeros(1000, requires_grad=True)
    z = sample_hard_concrete(log_alpha, **CONSTANTS)
    assert bool(((z >= 0) & (z <= 1)).all())
    z.sum().backward()
    assert log_alpha.grad.abs().sum() > 0


def test_topk_keep_hand_computed_with_ties_and_groups():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.5, 0.2]])
    assert topk_keep(scores, 3).tolist() == [[True, True, True, False, False, False]]
    assert topk_keep(scores, 1, groups=3).tolist() == [[False, True, True, False, True, False]]
    with pytest.raises(ValueError, match="equal groups"):
        topk_keep(scores, 1, groups=4)


@pytest.mark.parametrize("seed", range(3))
def test_final_gates_hit_target_counts_exactly(seed):
    model = build_tiny_model("mistral-gqa")
    for config in (
        ShearingConfig(
            num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=37
        ),
        ShearingConfig(hidden_size=16, num_attention_heads=2, intermediate_size=5),
    ):
        shearing = ShearingModule.from_model(model, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in shearing.gates.log_alpha.values():
                param.copy_(torch.randint(-2, 3, param.shape, generator=generator).float())  # many ties
        gates = shearing.final_gates()
        plan = shearing.plan
        assert int((gates["layer"] != 0).sum()) == plan.target["num_hidden_layers"]
        assert int((gates["hidden"] != 0).sum()) == plan.target["hidden_size"]
        assert (gates["intermediate"] != 0).sum(1).tolist() == [plan.target["intermediate_size"]] * 2
        assert (gates["head"] != 0).sum(1).tolist() == [plan.target_units("head")] * 2
        if plan.head_gating == "query":
            assert (gates["head"] != 0).reshape(2, 2, 2).sum(-1).eq(1).all()
        survivors = gates["intermediate"][gates["intermediate"] != 0]
        assert bool(((survivors > 0) & (survivors < 1)).all())  # sigmoid(0.8 a / beta) soft values


def test_final_gates_binarize_hidden_for_tied_embeddings():
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=10,
        tie_word_embeddings=True,
    )
    plan = ShearingConfig(hidden_size=8, num_attention_heads=1, num_key_value_heads=1).plan(cfg)
    gates = final_gates({"hidden": torch.arange(16.0)}, plan, {"hidden": torch.full((16,), 0.7)})
    assert gates["hidden"].tolist() == [0.0] * 8 + [1.0] * 8


def test_expected_sparsity_and_warmup():
    assert expected_sparsity(torch.tensor([[1.0, 0.0, 0.5, 0.5]])).tolist() == [0.5]
    assert warmup_target(0.4, 0, 100, 0.2) == 0.0
    assert warmup_target(0.4, 10, 100, 0.2) == pytest.approx(0.2)
    assert warmup_target(0.4, 99, 100, 0.2) == pytest.approx(0.4)
    assert warmup_target(0.4, 0, 100, 0.0) == pytest.approx(0.4)


def _lagrangian_steps(log_alpha_init: float, target_layers: int, steps: int):
    model = build_tiny_model("llama")
    config = ShearingConfig(num_hidden_layers=target_layers, structures=["layer"], lagrangian_warmup=0.0)
    shearing = ShearingModule.from_model(model, config)
    with torch.no_grad():
        shearing.gates.log_alpha["layer"].fill_(log_alpha_init)
    optimizer = torch.optim.AdamW(shearing_param_groups(shearing))
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        shearing.penalty().backward()
        optimizer.step()
        history.append(
            (float(shearing.lagrangian.lambda_1["layer"].detach()), shearing.gates.log_alpha["layer"].detach().clone())
        )
    return history


def test_lagrangian_below_target_ascends_lambda_and_lowers_gate_logits():
    # All gates on (s_hat ~ 0) and a target of 50% layer sparsity: s_hat < t.
    history = _lagrangian_steps(4.0, target_layers=1, steps=2)
    lambda_1, logits = history[0]
    # Ascent on lambda_1 * (s_hat - t): with s_hat - t < 0 the multiplier term rises from 0 to > 0, i.e. lambda_1 < 0.
    assert lambda_1 < 0
    assert torch.equal(logits, torch.full((2,), 4.0))  # lambda was 0, so the first step cannot move the logits
    assert bool((history[1][1] < 4.0).all())  # with the updated multipliers the logits go down: sparser


def test_lagrangian_above_target_raises_lambda_and_raises_gate_logits():
    history = _lagrangian_steps(-4.0, target_layers=1, steps=2)  # all gates off: s_hat ~ 1 > t = 0.5
    assert history[0][0] > 0
    assert bool((history[1][1] > -4.0).all())


def test_masked_rms_norm_equals_rms_norm_on_kept_channels():
    from optimum_admm.structured.gating import masked_rms_norm

    x = torch.randn(2, 3, 6)
    gate = torch.tensor([0.5, 0.0, 1.0, 0.0, 0.25, 1.0])
    x = x * (gate != 0)
    weight = torch.rand(6)
    out = masked_rms_norm(x, weight, gate, eps=1e-6)
    keep = gate != 0
    kept = x[..., keep]
    reference = weight[keep] * kept * torch.rsqrt(kept.pow(2).mean(-1, keepdim=True) + 1e-6) * gate[keep]
    torch.testing.assert_close(out[..., keep], reference)
    assert bool((out[..., ~keep] == 0).all())


def test_one_draw_per_forward_reused_under_gradient_checkpointing():
    config = ShearingConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32
    )
    input_ids = torch.randint(0, 300, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model = build_tiny_model("mistral-gqa").train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        shearing = ShearingModule.from_model(model, config)
        with torch.no_grad():  # mid-range logits: gates strictly inside (0, 1) often, so gradients flow
            for param in shearing.gates.log_alpha.values():
                param.fill_(0.5)
        shearing.attach(model)
        torch.manual_seed(0)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        assert shearing.num_samples == 1
        grads.append({k: p.grad.clone() for k, p in shearing.gates.log_alpha.items()})
        shearing.detach()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])
        assert grads[0][name].abs().sum() > 0
