"""Configs are strict on construction (ValueError naming field, value and what is allowed) and round-trip."""

from __future__ import annotations

import json
import warnings

import pytest

from optimum_admm import ADMMConfig, PruningConfig
from optimum_admm.configuration import ROUTERS, parse_nm


def test_defaults_match_the_paper():
    config = ADMMConfig()
    assert config.sparsity == 0.5
    assert config.mask_structure == "unstructured"
    assert (config.iterations, config.mask_iterations, config.rho, config.dampening) == (20, 15, 1.0, 0.1)
    assert (config.num_samples, config.sequence_length, config.seed) == (128, 2048, 0)
    assert config.schedule == "cubic" and config.per_output is False and config.true_sequential is False
    assert config.ignore == ["lm_head", ROUTERS]


@pytest.mark.parametrize(
    ("structure", "expected"),
    [("2:4", (2, 4)), ("4:8", (4, 8)), (" 1 : 4 ", (1, 4)), ("unstructured", None), ("UNSTRUCTURED", None)],
)
def test_parse_nm(structure, expected):
    assert parse_nm(structure) == expected


def test_nm_sets_the_implied_sparsity():
    assert ADMMConfig(mask_structure="2:4").sparsity == 0.5
    assert ADMMConfig(mask_structure="1:4").sparsity == 0.75
    assert ADMMConfig(sparsity=0.5, mask_structure="4:8").nm == (4, 8)


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"sparsity": 1.0}, "sparsity", "1.0"),
        ({"sparsity": -0.1}, "sparsity", "-0.1"),
        ({"sparsity": "0.5"}, "sparsity", "'0.5'"),
        ({"mask_structure": "4:2"}, "mask_structure", "'4:2'"),
        ({"mask_structure": "2:2"}, "mask_structure", "'2:2'"),
        ({"mask_structure": "0:4"}, "mask_structure", "'0:4'"),
        ({"mask_structure": "a:b"}, "mask_structure", "'a:b'"),
        ({"mask_structure": "2.5:4"}, "mask_structure", "'2.5:4'"),
        ({"mask_structure": "2-4"}, "mask_structure", "'2-4'"),
        ({"mask_structure": "2:4", "sparsity": 0.6}, "sparsity", "0.6"),
        ({"iterations": 0}, "iterations", "0"),
        ({"iterations": -3}, "iterations", "-3"),
        ({"mask_iterations": 0}, "mask_iterations", "0"),
        ({"iterations": 10, "mask_iterations": 15}, "mask_iterations", "15"),
        ({"schedule": "linear"}, "schedule", "'linear'"),
        ({"num_samples": 0}, "num_samples", "0"),
        ({"calibration_batch_size": 0}, "calibration_batch_size", "0"),
        ({"calibration_batch_size": 2.0}, "calibration_batch_size", "2.0"),
        ({"sequence_length": 0}, "sequence_length", "0"),
        ({"rho": 0.0}, "rho", "0.0"),
        ({"dampening": -1.0}, "dampening", "-1.0"),
        ({"targets": []}, "targets", "[]"),
        ({"ignore": ["re:("]}, "ignore", "'re:('"),
        ({"per_output": "yes"}, "per_output", "'yes'"),
    ],
)
def test_bad_values_raise_naming_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError) as info:
        ADMMConfig(**kwargs)
    message = str(info.value)
    assert field in message and value in message
    assert "allowed" in message or "needs" in message or "regex" in message or "pass sparsity" in message


def test_round_trip_through_json(tmp_path):
    config = ADMMConfig(sparsity=0.7, schedule="constant", targets=["re:.*mlp.*"], per_output=True)
    path = tmp_path / "recipe.json"
    config.to_json_file(path)
    data = json.loads(path.read_text())
    assert data["method"] == "admm" and "optimum_admm_version" in data
    assert PruningConfig.from_dict(data) == config
    assert ADMMConfig.from_dict(data) == config


def test_unknown_keys_from_a_newer_version_warn_and_are_ignored():
    data = {**ADMMConfig().to_dict(), "future_knob": 3}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = PruningConfig.from_dict(data)
    assert config == ADMMConfig()
    assert any("future_knob" in str(w.message) for w in caught)


def test_unknown_method_on_load():
    with pytest.raises(ValueError, match="method='nope'"):
        PruningConfig.from_dict({"method": "nope"})


def test_admm_presets():
    from optimum_admm.configuration import ADMM_PRESETS

    assert ADMM_PRESETS["paper"] == {
        "iterations": ADMMConfig().iterations,
        "mask_iterations": ADMMConfig().mask_iterations,
    }
    fast = ADMMConfig.from_preset("fast", sparsity=0.6, mask_iterations=2)
    assert (fast.iterations, fast.mask_iterations, fast.sparsity) == (4, 2, 0.6)
    with pytest.raises(ValueError, match=r"preset='quick' is unknown; allowed: 'paper', 'balanced', 'fast'"):
        ADMMConfig.from_preset("quick")
