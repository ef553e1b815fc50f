"""ShearingConfig validation and its resolution against a source model (ShearingPlan)."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, MistralConfig

from optimum_admm.structured import ShearingConfig


def _mistral() -> MistralConfig:
    return MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"hidden_size": 1.5}, "hidden_size"),
        ({"structures": ["layer", "neuron"]}, "structures"),
        ({"head_gating": "bogus"}, "head_gating"),
        ({"lagrangian_warmup": -0.1}, "lagrangian_warmup"),
        ({"gate_learning_rate": 0.0}, "gate_learning_rate"),
        ({"temperature": -1.0}, "temperature"),
        ({"limit_left": 0.1}, "limit_left"),
        ({"limit_right": 0.9}, "limit_right"),
        ({"tied_embeddings": "share"}, "tied_embeddings"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ShearingConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_hidden_layers": 5}, "num_hidden_layers=5 exceeds"),
        ({"intermediate_size": 65}, "intermediate_size=65 exceeds"),
        ({"num_attention_heads": 3, "num_key_value_heads": 2, "hidden_size": 24}, "not a multiple"),
        ({"num_attention_heads": 2, "num_key_value_heads": 1}, "hidden_size=32 != num_attention_heads=2"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, "num_attention_heads must be 2"),
        (
            {"num_attention_heads": 2, "num_key_value_heads": 2, "hidden_size": 16, "head_gating": "kv_group"},
            "num_attention_heads must be 4",
        ),
        (
            {"num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 16, "head_gating": "query"},
            "keeps every KV head",
        ),
        ({"hidden_size": 16, "num_attention_heads": 2, "structures": ["layer", "head"]}, "'hidden' gate"),
        ({"num_hidden_layers": 2, "structures": ["head", "intermediate", "hidden"]}, "num_hidden_layers=2 is below"),
    ],
)
def test_plan_errors_name_the_dimension(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShearingConfig(**kwargs).plan(_mistral())


def test_plan_resolves_gqa_modes_and_counts():
    kv = ShearingConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2, num_key_value_heads=1).plan(
        _mistral()
    )
    assert kv.head_gating == "kv_group"
    assert kv.gate_shapes() == {"layer": (4,), "head": (4, 2), "intermediate": (4, 64), "hidden": (32,)}
    assert (kv.target_units("head"), kv.target_sparsity("layer")) == (1, 0.25)
    query = ShearingConfig(hidden_size=16, num_attention_heads=2).plan(_mistral())
    assert query.head_gating == "query"
    assert query.gate_shapes()["head"] == (4, 4)
    assert query.query_groups == 2 and query.target_units("head") == 2


def test_plan_unpruned_dimensions_keep_source_and_mha():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50)
    plan = ShearingConfig(num_attention_heads=2, num_key_value_heads=2, hidden_size=16).plan(cfg)
    assert plan.head_gating == "kv_group"
    assert plan.target == {
        "num_hidden_layers": 2,
        "hidden_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
    }


def test_strict_head_dim_can_be_relaxed_and_config_round_trips():
    config = ShearingConfig(num_attention_heads=2, num_key_value_heads=1, strict_head_dim=False)
    assert config.plan(_mistral()).target["hidden_size"] == 32
    data = config.to_dict()
    assert data["method"] == "sheared_llama" and "optimum_admm_version" in data
    with pytest.warns(UserWarning, match="unknown"):
        assert ShearingConfig.from_dict({**data, "from_the_future": 1}) == config
