"""Calibration activations on disk: memory-mapped, unlinked files; the same pruned weights as in RAM."""

from __future__ import annotations

import collections
import shutil

import pytest
import torch
from conftest import build_tiny_model

import optimum_admm.activations as activations
from optimum_admm import ADMMConfig, ADMMPruner
from optimum_admm.activations import DiskActivations, resolve_storage
from optimum_admm.streaming import prune_checkpoint

FAST = {"num_samples": 4, "sequence_length": 32, "seed": 1}


def _prune(tokenizer, text, **kwargs):
    pruner = ADMMPruner.from_pretrained(build_tiny_model("llama"), tokenizer=tokenizer, config=ADMMConfig(**FAST))
    report = pruner.prune([text], show_progress=False, **kwargs)
    return pruner.model.state_dict(), report


def test_disk_activations_give_identical_weights_and_leave_nothing(tokenizer, corpus_text, tmp_path, monkeypatch):
    expected, expected_report = _prune(tokenizer, corpus_text)
    stored = collections.Counter()
    real = DiskActivations.store

    def counting(self, tensor):
        out = real(self, tensor)
        stored[tuple(out.shape)] += 1
        assert not any(self.directory.iterdir())  # mapped, then unlinked at once
        return out

    monkeypatch.setattr(DiskActivations, "store", counting)
    cache = tmp_path / "cache"
    state, report = _prune(
        tokenizer, corpus_text, activation_cache_dir=cache, activation_memory=1024
    )  # RAM budget n/a
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert [r.relative_error for r in report.layers] == [r.relative_error for r in expected_report.layers]
    blocks = len(build_tiny_model("llama").model.layers)
    # captured inputs + the outputs of every block but the last (which feed nothing), every sample once
    assert sum(shape[0] * count for shape, count in stored.items()) == FAST["num_samples"] * blocks
    assert list(cache.iterdir()) == []


def test_budget_error_points_to_the_disk_cache(tokenizer, corpus_text):
    with pytest.raises(ValueError, match=r"activation_memory=1024 .* activation_cache_dir"):
        _prune(tokenizer, corpus_text, activation_memory=1024)


def test_cache_dir_without_room_is_refused_before_any_forward(tokenizer, corpus_text, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda path: usage._replace(free=100))
    forwards = []
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda *a, **k: forwards.append(1))
    with pytest.raises(OSError, match=r"activation_cache_dir=.* has 100 B free, but .* need 32.00 KiB"):
        _prune(tokenizer, corpus_text, activation_cache_dir=tmp_path / "cache")
    assert forwards == []


@pytest.mark.parametrize("bad", [None, ""])
def test_bad_cache_dir(bad, tmp_path):
    if bad is None:
        bad = tmp_path / "a-file"
        bad.write_text("x")
    with pytest.raises(ValueError, match="activation_cache_dir="):
        resolve_storage("cpu", bad)


def test_streaming_with_disk_activations_is_identical(tokenizer, corpus_text, tmp_path):
    source = tmp_path / "source"
    build_tiny_model("llama").save_pretrained(source, max_shard_size="20KB")
    tokenizer.save_pretrained(source)
    config = ADMMConfig(**FAST)
    prune_checkpoint(source, tmp_path / "ram", config, [corpus_text], show_progress=False)
    prune_checkpoint(
        source, tmp_path / "disk", config, [corpus_text], show_progress=False, activation_cache_dir=tmp_path / "c"
    )
    for ram, disk in zip(
        sorted((tmp_path / "ram").glob("*.safetensors")),
        sorted((tmp_path / "disk").glob("*.safetensors")),
        strict=True,
    ):
        assert ram.read_bytes() == disk.read_bytes(), ram.name
