"""prune_to_shape: the masked model with final gates equals the sliced model; the sliced model is a standard model."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB_SIZE, build_tiny_model
from transformers import AutoModelForCausalLM

from optimum_admm.structured import ShearingConfig, ShearingModule, prune_to_shape
from optimum_admm.structured.baselines import norm_gates, random_gates

GQA_TARGET = {
    "num_hidden_layers": 1,
    "hidden_size": 16,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 40,
}
CASES = {
    "llama": ("llama", {**GQA_TARGET, "num_key_value_heads": 2}, "binarize"),
    "mistral-gqa": ("mistral-gqa", GQA_TARGET, "binarize"),
    "mistral-gqa-query": (
        "mistral-gqa",
        {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 24},
        "binarize",
    ),
    "qwen2": ("qwen2", GQA_TARGET, "binarize"),
    "llama-tied": ("llama-tied", {**GQA_TARGET, "num_key_value_heads": 2}, "binarize"),
    "llama-tied-untie": ("llama-tied", {**GQA_TARGET, "num_key_value_heads": 2}, "untie"),
}


def _build(name: str, seed: int = 0):
    if name != "llama-tied":
        model = build_tiny_model(name, seed)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=256,
                tie_word_embeddings=True,
            )
        ).eval()
    # Larger weights than the default init so that a wrong fold or slice shows in the logits.
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.15)
    return model


def _sheared(case: str):
    name, target, tied = CASES[case]
    model = _build(name)
    shearing = ShearingModule.from_model(model, ShearingConfig(**target, tied_embeddings=tied))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in shearing.gates.log_alpha.values():
            param.copy_(torch.empty(param.shape).uniform_(-3.0, 3.0, generator=generator))
    return model, shearing


@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_model_with_final_gates_equals_sliced_model(case):
    model, shearing = _sheared(case)
    input_ids = torch.randint(0, VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(input_ids).logits
        shearing.attach(model)
        masked = model(input_ids).logits
        shearing.detach()
    small = prune_to_shape(model, shearing)
    with torch.no_grad():
        sliced = small(input_ids).logits
    assert (masked - dense).abs().max() > 1e-2  # the gates do change the model
    torch.testing.assert_close(sliced, masked, atol=1e-4, rtol=0)
    for key, value in shearing.plan.target.items():
        assert getattr(small.config, key) == value
    assert small.config.head_dim == shearing.plan.head_dim
    if case == "llama-tied":
        assert small.lm_head.weight is small.get_input_embeddings().weight
    if case == "llama-tied-untie":
        assert small.config.tie_word_embeddings is False
    if case == "qwen2":
        assert small.model.layers[0].self_attn.q_proj.bias.shape == (16,)


@pytest.mark.parametrize("case", ["mistral-gqa", "llama-tied"])
def test_sliced_model_reloads_with_target_config_and_parameter_count(case, tmp_path):
    model, shearing = _sheared(case)
    small = prune_to_shape(model, shearing)
    small.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for key, value in shearing.plan.target.items():
        assert getattr(reloaded.config, key) == value
    fresh = type(model)(reloaded.config)
    count = sum(p.numel() for p in reloaded.parameters())
    assert count == sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in small.parameters())
    assert count < sum(p.numel() for p in model.parameters())
    input_ids = torch.randint(0, VOCAB_SIZE, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, small(input_ids).logits)


def test_prune_to_shape_rejects_uneven_and_unbinarised_tied_gates():
    model = _build("llama")
    heads = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="head gates keep different counts"):
        prune_to_shape(model, {"head": heads})
    tied = _build("llama-tied")
    with pytest.raises(ValueError, match="tied embeddings"):
        prune_to_shape(tied, {"hidden": torch.full((32,), 0.5)})


@pytest.mark.parametrize("method", ["random", "norm"])
def test_baselines_reach_the_same_target_shape(method):
    model = _build("mistral-gqa")
    plan = ShearingConfig(**GQA_TARGET).plan(model.config)
    if method == "random":
        gates = random_gates(plan, seed=3)
    else:
        gates = norm_gates(model, plan, input_ids=torch.randint(0, VOCAB_SIZE, (2, 16)))
    small = prune_to_shape(model, gates)
    for key, value in plan.target.items():
        assert getattr(small.config, key) == value
    with pytest.raises(ValueError, match="input_ids"):
        norm_gates(model, plan)


def test_norm_gates_keep_the_largest_ffn_channels():
    model = _build("llama")
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.up_proj.weight[5].mul_(100.0)
    plan = ShearingConfig(intermediate_size=1, structures=["intermediate"]).plan(model.config)
    gates = norm_gates(model, plan)
    assert gates["intermediate"].argmax(1).tolist() == [5, 5]
