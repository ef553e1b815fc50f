"""The model card: metadata the Hub reads, and a body that says what was done."""

from __future__ import annotations

import pytest
import yaml
from huggingface_hub import ModelCard

from optimum_admm import ADMMConfig
from optimum_admm.card import build_model_card, reproduce_command
from optimum_admm.export import pruning_metadata
from optimum_admm.reporting import LayerReport, PruningReport


def _report(config) -> PruningReport:
    layers = [LayerReport(f"model.layers.{i}.mlp.up_proj", (64, 32), 0.5, 0.01 * (i + 1), 0.1) for i in range(20)]
    calibration = {"dataset": "wikitext2", "num_samples": 16, "sequence_length": 256, "seed": 3}
    return PruningReport(method="admm", config=config.to_dict(), layers=layers, calibration=calibration)


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_metadata_and_body(tmp_path):
    config = ADMMConfig(mask_structure="2:4", num_samples=16, sequence_length=256, seed=3)
    metadata = pruning_metadata(config, _report(config), {"wikitext2": {"perplexity": 21.25, "sequence_length": 256}})
    card = build_model_card(metadata, base_model="org/base-model", license="apache-2.0")
    card.save(tmp_path / "README.md")
    data = _front_matter((tmp_path / "README.md").read_text())
    assert data["base_model"] == "org/base-model"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    assert set(data["tags"]) == {"pruned", "sparse", "admm", "2:4", "optimum-admm"}
    (result,) = data["model-index"][0]["results"]
    assert result["dataset"]["type"] == "wikitext"
    assert result["metrics"][0] == {"type": "perplexity", "value": 21.25, "name": "Perplexity"}
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.eval_results[0].metric_value == 21.25
    body = loaded.text
    for needle in ("## Method", "Boža 2024", "## Settings", "`mask_structure`", "## Calibration data", "`wikitext2`"):
        assert needle in body, needle
    assert "20 linear layers pruned" in body and "... 8 more" in body
    assert "stored **dense**" in body and "quantization_config" in body
    expected = (
        "optimum-cli admm prune --model org/base-model --method admm --sparsity 0.5 --pattern 2:4 --dataset wikitext2 "
        "--num-samples 16 --sequence-length 256 --seed 3"
    )
    assert expected in body


def test_license_inherited_from_a_local_base_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")

    class Config:
        _name_or_path = str(base)

    card = build_model_card(pruning_metadata(ADMMConfig(), None), model_config=Config())
    data = _front_matter(str(card))
    assert data["license"] == "mit"
    assert "base_model" not in data  # a local path is not a Hub id
    assert "model-index" not in data  # nothing measured, nothing claimed


def test_base_model_from_the_model_config_and_no_license_guess(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # no cached base card to inherit from

    class Config:
        _name_or_path = "HuggingFaceTB/SmolLM2-135M"

    data = _front_matter(
        str(build_model_card(pruning_metadata(ADMMConfig(sparsity=0.6), None), model_config=Config()))
    )
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert "license" not in data


def test_reproduce_command_uses_the_recipe_for_settings_without_a_flag():
    metadata = pruning_metadata(ADMMConfig(rho=2.0), None)
    metadata["calibration"] = {"dataset": "file:calib.txt"}
    command = reproduce_command(metadata, "org/base", "out")
    assert command == (
        "optimum-cli admm prune --model org/base --method admm --recipe pruning_config.json --dataset calib.txt "
        "--output out"
    )


def test_card_fields_name_real_datasets_and_a_complete_reproduce_command(tmp_path):
    from huggingface_hub import ModelCard

    from optimum_admm import ADMMConfig
    from optimum_admm.card import build_model_card, reproduce_command
    from optimum_admm.export import pruning_metadata

    metadata = pruning_metadata(ADMMConfig(sparsity=0.5), None, {"wikitext2": 20.0, "heldout.txt": 30.0})
    metadata["calibration"] = {"dataset": "datasets:org/corpus/en[train].body", "num_samples": 128}
    card = ModelCard(str(build_model_card(metadata, base_model="org/base")))
    assert card.data.datasets == ["org/corpus", "wikitext"]
    types = {result.dataset_name: result.dataset_type for result in card.data.eval_results}
    assert types == {"WikiText-2": "wikitext", "heldout.txt (local file)": "text"}  # a file is never a dataset id
    command = reproduce_command(metadata, "org/base", "out")
    assert "--dataset org/corpus --dataset-config en --dataset-split train --text-column body" in command
    local = tmp_path / "dense-model"
    local.mkdir()
    from types import SimpleNamespace

    text = str(build_model_card(metadata, model_config=SimpleNamespace(_name_or_path=str(local))))
    assert f"--model {local}" in text and "DENSE_MODEL_PATH" not in text  # the local source, not a placeholder


def test_lm_eval_metrics_are_accepted_as_evaluation_results(tmp_path):
    from huggingface_hub import ModelCard

    from optimum_admm import ADMMConfig
    from optimum_admm.card import build_model_card
    from optimum_admm.export import normalize_evaluation_results, pruning_metadata

    results = {"wikitext2": 21.5, "arc_easy": {"acc": 0.61, "acc_norm": 0.58, "alias": "arc_easy"}}
    assert normalize_evaluation_results(results)["arc_easy"] == {"acc": 0.61, "acc_norm": 0.58}
    with pytest.raises(ValueError, match="lm-eval results"):
        normalize_evaluation_results({"arc_easy": {"alias": "arc_easy"}})  # no metric at all
    card = ModelCard(str(build_model_card(pruning_metadata(ADMMConfig(), None, results), base_model="org/base")))
    metrics = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert metrics == {("WikiText-2", "perplexity"): 21.5, ("arc_easy", "acc"): 0.61, ("arc_easy", "acc_norm"): 0.58}
    assert "| `arc_easy` | acc 0.6100, acc_norm 0.5800 |" in card.text
