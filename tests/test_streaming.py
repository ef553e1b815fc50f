"""Streaming mode: pruning a sharded checkpoint block by block equals pruning the loaded model, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model
from transformers import AutoModelForCausalLM

from optimum_admm import ADMMConfig, ADMMPruner, MagnitudeConfig
from optimum_admm.streaming import checkpoint_weight_map, prune_checkpoint

FAST = {"num_samples": 4, "sequence_length": 32, "seed": 1}


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("llama", ADMMConfig(**FAST)),
        ("gpt2", ADMMConfig(**FAST, mask_structure="2:4")),
        ("gemma3-sliding", ADMMConfig(**FAST)),
        ("opt", MagnitudeConfig(sparsity=0.5)),
    ],
)
def test_streaming_is_bitwise_identical_to_in_memory(family, config, tokenizer, corpus_text, tmp_path):
    source = tmp_path / "source"
    build_tiny_model(family).save_pretrained(source, max_shard_size="20KB")
    tokenizer.save_pretrained(source)
    assert len(set(checkpoint_weight_map(source).values())) > 1  # really sharded
    before = {p.name: p.read_bytes() for p in source.iterdir()}

    result = prune_checkpoint(source, tmp_path / "out", config, [corpus_text], show_progress=False)
    pruner = ADMMPruner.from_pretrained(str(source), config=config)
    expected_report = pruner.prune(calibration_dataset=[corpus_text], show_progress=False)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = pruner.model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert [r.relative_error for r in result.report.layers] == [r.relative_error for r in expected_report.layers]
    assert result.report.sparsity == pytest.approx(0.5)
    assert json.loads((tmp_path / "out" / "pruning_config.json").read_text())["config"]["method"] == config.method
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert result.load_seconds > 0 and result.write_seconds > 0


def test_streaming_refuses_bad_source_and_budget(tokenizer, corpus_text, tmp_path):
    with pytest.raises(ValueError, match="source=.*safetensors"):
        prune_checkpoint(tmp_path, tmp_path / "out", ADMMConfig(**FAST), [corpus_text])
    source = tmp_path / "source"
    build_tiny_model("llama").save_pretrained(source)
    tokenizer.save_pretrained(source)
    with pytest.raises(ValueError, match="max_memory=1024 .*need 32.00 KiB"):
        prune_checkpoint(source, tmp_path / "out", ADMMConfig(**FAST), [corpus_text], max_memory=1024)
    assert not (tmp_path / "out").exists()
