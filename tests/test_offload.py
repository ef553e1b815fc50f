"""Device-map mode: a model dispatched by accelerate with disk offload prunes exactly like the in-memory one."""

from __future__ import annotations

import logging

import pytest
import torch
from accelerate import dispatch_model
from accelerate.utils import OffloadedWeightsLoader
from conftest import assert_pruned_alike, build_tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from optimum_admm import ADMMConfig, ADMMPruner, SparseGPTConfig
from optimum_admm.modeling import find_decoder_blocks
from optimum_admm.offload import find_offload_hook, onloaded, write_offloaded_tensor

FAST = {"num_samples": 4, "sequence_length": 32, "seed": 1}


def _device_map(model, offloaded: set[int]) -> dict[str, str]:
    """Every block on its own entry ("disk" for the indices in ``offloaded``), everything else on "cpu"."""
    blocks_name, blocks = find_decoder_blocks(model)
    mapping = {f"{blocks_name}.{i}": "disk" if i in offloaded else "cpu" for i in range(len(blocks))}
    parts = blocks_name.split(".")
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        for child, _ in model.get_submodule(parent).named_children():
            full = f"{parent}.{child}" if parent else child
            if full != ".".join(parts[: depth + 1]):
                mapping[full] = "cpu"
    return mapping


def _prune(model, tokenizer, text, config):
    pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=config)
    return pruner.prune(calibration_dataset=[text], show_progress=False)


def _weights(model) -> dict[str, torch.Tensor]:
    """Every block weight, read through the offload hooks when offloaded."""
    blocks_name, blocks = find_decoder_blocks(model)
    out = {}
    for i, block in enumerate(blocks):
        for local, module in block.named_modules():
            if hasattr(module, "weight") and isinstance(module.weight, torch.Tensor):
                name = f"{blocks_name}.{i}.{local}" if local else f"{blocks_name}.{i}"
                with onloaded(model, name, write_back=False) as m:
                    out[name] = m.weight.detach().clone()
    return out


@pytest.mark.parametrize(
    ("family", "config"),
    [("llama", ADMMConfig(**FAST)), ("gpt2", SparseGPTConfig(**FAST, true_sequential=True))],
)
def test_disk_offloaded_prune_is_bitwise_identical(family, config, tokenizer, corpus_text, tmp_path):
    reference = build_tiny_model(family)
    _prune(reference, tokenizer, corpus_text, config)

    model = build_tiny_model(family)
    model = dispatch_model(model, _device_map(model, offloaded={1}), offload_dir=str(tmp_path / "offload"))
    name = f"{find_decoder_blocks(model)[0]}.1"
    linears = [
        f"{name}.{n}" for n, m in model.get_submodule(name).named_modules() if isinstance(m, nn.Linear | Conv1D)
    ]
    assert linears and all(find_offload_hook(model, n) is not None for n in linears)  # block 1 lives on disk
    assert all(p.device.type == "meta" for p in model.get_submodule(name).parameters())
    report = _prune(model, tokenizer, corpus_text, config)
    assert report.sparsity == pytest.approx(0.5)

    assert_pruned_alike(reference, model, _weights, tokenizer(corpus_text[:300], return_tensors="pt")["input_ids"])
    assert all(p.device.type == "meta" for p in model.get_submodule(name).parameters())


def test_write_back_to_cpu_offloaded_state_dict():
    stored = torch.ones(2, 2)
    loader = OffloadedWeightsLoader(state_dict={"block.linear.weight": stored})
    from accelerate.utils import PrefixedDataset

    write_offloaded_tensor(PrefixedDataset(loader, "block."), "linear.weight", torch.zeros(2, 2))
    assert torch.equal(stored, torch.zeros(2, 2))  # in place: no second copy kept


def test_activation_memory_is_logged_and_budget_refused(tokenizer, corpus_text, caplog):
    model = build_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=ADMMConfig(**FAST))
    # 2 x 4 samples x 32 tokens x hidden 32 x 4 bytes = 32 KiB
    with pytest.raises(ValueError, match=r"activation_memory=1000 .*need 32.00 KiB.*num_samples=4"):
        pruner.prune(calibration_dataset=[corpus_text], show_progress=False, activation_memory=1000)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="activation_memory='lots'"):
        pruner.prune(calibration_dataset=[corpus_text], show_progress=False, activation_memory="lots")
    with caplog.at_level(logging.INFO, logger="optimum_admm.memory"):
        pruner.prune(calibration_dataset=[corpus_text], show_progress=False, activation_memory={"cpu": "1MiB"})
    assert "calibration activations: 32.00 KiB on cpu" in caplog.text
    # the former name (which clashes with accelerate's weight budget) still works, with a FutureWarning
    with pytest.warns(FutureWarning, match="renamed activation_memory"), pytest.raises(ValueError, match="need"):
        pruner.prune(calibration_dataset=[corpus_text], show_progress=False, max_memory=1000)
    with pytest.raises(ValueError, match="both given"):
        pruner.prune(calibration_dataset=[corpus_text], max_memory=1000, activation_memory=1000)


def test_device_map_benchmark_compares_a_cpu_and_disk_map_with_the_cpu_run(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "device_map.py"
    output = tmp_path / "result.json"
    sizes = ["--layers", "3", "--hidden", "64", "--intermediate", "160", "--vocab", "512"]
    subprocess.run(
        [sys.executable, str(script), "--devices", "cpu", "--disk", *sizes, "--num-samples", "2",
         "--sequence-length", "32", "--method", "sparsegpt", "--output", str(output)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(output.read_text())
    assert result["device_map"]["model.layers.2"] == "disk" and result["devices"] == ["cpu"]
    assert result["bitwise_identical"] and result["share_of_identical_mask_entries"] == 1.0
    assert result["config"]["method"] == "sparsegpt"
