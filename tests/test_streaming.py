"""Streaming mode: pruning a sharded checkpoint block by block equals pruning the loaded model, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, interrupt_at_block
from transformers import AutoModelForCausalLM

import optimum_admm.sequential as sequential
import optimum_admm.streaming as streaming
from optimum_admm import ADMMConfig, ADMMPruner, MagnitudeConfig, WandaConfig
from optimum_admm.streaming import checkpoint_weight_map, prune_checkpoint

FAST = {"num_samples": 4, "sequence_length": 32, "seed": 1}


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("llama", ADMMConfig(**FAST)),
        ("gpt2", ADMMConfig(**FAST, mask_structure="2:4")),
        ("gemma3-sliding", ADMMConfig(**FAST)),
        ("opt", MagnitudeConfig(sparsity=0.5)),
        ("opt", WandaConfig(**FAST)),
        ("gpt-neox", WandaConfig(**FAST)),
        ("qwen2", WandaConfig(**FAST, mask_structure="2:4")),
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
    with pytest.raises(ValueError, match="activation_memory=1024 .*need 32.00 KiB"):
        prune_checkpoint(source, tmp_path / "out", ADMMConfig(**FAST), [corpus_text], activation_memory=1024)
    assert not (tmp_path / "out").exists()


def _save_source(family, tokenizer, directory):
    build_tiny_model(family).save_pretrained(directory, max_shard_size="20KB")
    tokenizer.save_pretrained(directory)
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_streaming_interrupted_then_resumed_is_identical(tokenizer, corpus_text, tmp_path, monkeypatch):
    """Interrupted at block 2 of 3, the same call continues from block 2 and writes the uninterrupted output."""
    source = tmp_path / "source"
    before = _save_source("gemma3-sliding", tokenizer, source)
    config = ADMMConfig(**FAST)
    expected = prune_checkpoint(source, tmp_path / "expected", config, [corpus_text], show_progress=False)

    checkpoint, out = tmp_path / "ckpt", tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_at_block(patch, block=2)
        with pytest.raises(KeyboardInterrupt):
            prune_checkpoint(source, out, config, [corpus_text], show_progress=False, checkpoint_dir=checkpoint)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing that looks complete
    assert sorted(p.name for p in checkpoint.glob("block-*")) == ["block-00000.safetensors", "block-00001.safetensors"]

    calls = []

    real = sequential._prune_block
    monkeypatch.setattr(
        sequential, "_prune_block", lambda run, index, inputs: calls.append(index) or real(run, index, inputs)
    )
    result = prune_checkpoint(source, out, config, [corpus_text], show_progress=False, checkpoint_dir=checkpoint)
    assert calls == [2]  # blocks 0 and 1 were not pruned again
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "expected").state_dict()
    assert loaded.keys() == reference.keys()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, reference[name]), name
    assert [r.relative_error for r in result.report.layers] == [r.relative_error for r in expected.report.layers]
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_streaming_resume_refuses_a_changed_recipe_or_checkpoint(tokenizer, corpus_text, tmp_path, monkeypatch):
    source, other = tmp_path / "source", tmp_path / "other"
    _save_source("llama", tokenizer, source)
    checkpoint = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        interrupt_at_block(patch, block=1)
        with pytest.raises(KeyboardInterrupt):
            prune_checkpoint(
                source, tmp_path / "out", ADMMConfig(**FAST), [corpus_text], show_progress=False,
                checkpoint_dir=checkpoint,
            )  # fmt: skip
    with pytest.raises(ValueError, match=r"config\.sparsity: 0\.5 -> 0\.6"):
        prune_checkpoint(
            source, tmp_path / "out", ADMMConfig(**{**FAST, "sparsity": 0.6}), [corpus_text], checkpoint_dir=checkpoint
        )
    build_tiny_model("llama", seed=1).save_pretrained(other, max_shard_size="20KB")
    tokenizer.save_pretrained(other)
    # another checkpoint with the same names and shapes: its embedding values differ (read from the shards)
    with pytest.raises(ValueError, match=r"source: '[0-9a-f]+' -> '[0-9a-f]+'"):
        prune_checkpoint(other, tmp_path / "out", ADMMConfig(**FAST), [corpus_text], checkpoint_dir=checkpoint)
    assert not (tmp_path / "out").exists()


def test_capture_reads_only_the_embedding_rows_of_the_calibration_tokens(tokenizer, tmp_path, monkeypatch):
    source = tmp_path / "source"
    _save_source("llama", tokenizer, source)
    ids = torch.tensor([[5, 6, 7, 40, 41, 90, 5, 6]])
    seen = {}
    real_rows = streaming._embedding_rows

    def rows(model, *args):
        seen["meta_during_capture"] = model.get_input_embeddings().weight.is_meta
        embed = real_rows(model, *args)
        seen["embedding"] = model.get_input_embeddings()
        seen["compact_rows"] = embed(torch.tensor([[5, 90]])).shape
        return embed

    monkeypatch.setattr(streaming, "_embedding_rows", rows)
    config = WandaConfig(num_samples=1, sequence_length=8)
    prune_checkpoint(source, tmp_path / "out", config, ids, show_progress=False)
    assert seen["meta_during_capture"]  # never loaded whole for the capture
    assert seen["embedding"].weight.is_meta  # the compact weight was swapped back out
    assert seen["compact_rows"] == (1, 2, build_tiny_model("llama").config.hidden_size)
    assert streaming._row_runs([5, 6, 7, 40, 41, 90]) == [(5, 8), (40, 42), (90, 91)]

    too_large = torch.tensor([[1, 2, 3, 10**6, 4, 5, 6, 7]])
    with pytest.raises(ValueError, match=r"calibration_dataset holds token id 1000000; allowed: 0 to \d+"):
        prune_checkpoint(source, tmp_path / "out2", config, too_large, show_progress=False)
    assert not (tmp_path / "out2").exists()
