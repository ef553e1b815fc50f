"""Saving: plain-transformers round trip, sharding, masks, the sidecar, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model

from optimum_admm import ADMMConfig, ADMMPruner, PruningConfig
from optimum_admm.export import MASKS_NAME, load_masks, load_pruning_config, read_pruning_metadata

FAST = {"num_samples": 4, "sequence_length": 32}


@pytest.fixture(scope="module")
def pruned(tokenizer, corpus_text):
    """One pruned tiny model shared by the tests of this module (they only read it)."""
    model = build_tiny_model("llama")
    config = ADMMConfig(sparsity=0.5, mask_structure="2:4", iterations=8, mask_iterations=4, **FAST)
    pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=config)
    pruner.prune(calibration_dataset=[corpus_text], show_progress=False)
    return pruner


def _logits(model, tokenizer, text):
    ids = tokenizer(text[:300], return_tensors="pt")["input_ids"][:, :40]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_round_trip_with_plain_transformers(pruned, tmp_path, corpus_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pruned.evaluation_results = {"wikitext2": 123.5}
    try:
        out = pruned.save_pretrained(tmp_path / "out")
    finally:
        del pruned.evaluation_results
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert torch.equal(_logits(reloaded, tokenizer, corpus_text), _logits(pruned.model, pruned.tokenizer, corpus_text))
    for name, param in pruned.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name] == 0, param == 0), name
    assert load_pruning_config(out) == pruned.config
    config_json = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config_json and "sparsity_config" not in json.dumps(config_json)
    meta = read_pruning_metadata(out)
    assert meta["method"] == "admm" and meta["storage"] == "dense"
    assert meta["calibration"] == {
        "dataset": "list[str] (1 texts)",
        "num_samples": 4,
        "sequence_length": 32,
        "seed": 0,
    }
    assert meta["evaluation"] == {"wikitext2": {"perplexity": 123.5}}
    assert set(meta["layers"]) == {r.name for r in pruned.report.layers}
    assert all(row["sparsity"] == pytest.approx(0.5) for row in meta["layers"].values())
    assert {"optimum-admm", "torch", "transformers", "huggingface-hub"} <= set(meta["versions"])
    assert (out / "README.md").is_file()


def test_saved_recipe_reads_back_for_every_registered_method(tmp_path):
    from optimum_admm.export import pruning_metadata
    from optimum_admm.registry import registered_methods

    for method, cls in registered_methods().items():
        config = cls(sparsity=0.25, seed=7)
        path = tmp_path / f"{method}.json"
        path.write_text(json.dumps(pruning_metadata(config, None)))
        assert PruningConfig.from_dict(json.loads(path.read_text())["config"]) == config, method


def test_sharded_save_loads(pruned, tmp_path, corpus_text):
    from transformers import AutoModelForCausalLM

    out = pruned.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(
        _logits(reloaded, pruned.tokenizer, corpus_text), _logits(pruned.model, pruned.tokenizer, corpus_text)
    )


def test_masks_are_packed_and_load_back(pruned, tmp_path):
    out = pruned.save_pretrained(tmp_path / "masked", save_masks=True)
    masks = load_masks(out)
    assert set(masks) == {f"{r.name}.weight" for r in pruned.report.layers}
    params = dict(pruned.model.named_parameters())
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and torch.equal(mask, params[name] != 0), name
    dense_bytes = sum(m.numel() for m in masks.values())  # one byte per weight if stored as bool
    assert (out / MASKS_NAME).stat().st_size < dense_bytes / 4
    assert read_pruning_metadata(out)["masks"]["file"] == MASKS_NAME


def test_bad_save_arguments_fail_before_writing(pruned, tmp_path):
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        pruned.save_pretrained(tmp_path / "a", max_shard_size="lots")
    with pytest.raises(ValueError, match="evaluation_results"):
        pruned.save_pretrained(tmp_path / "a", evaluation_results={"wikitext2": "low"})
    with pytest.raises(ValueError, match="save_masks=1"):
        pruned.save_pretrained(tmp_path / "a", save_masks=1)
    unpruned = ADMMPruner.from_pretrained(build_tiny_model("llama"), tokenizer=pruned.tokenizer)
    with pytest.raises(ValueError, match="save_masks=True needs a pruned model"):
        unpruned.save_pretrained(tmp_path / "a", save_masks=True)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_leaves_nothing(pruned, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise KeyboardInterrupt("interrupted while saving the tokenizer")

    monkeypatch.setattr(type(pruned.tokenizer), "save_pretrained", explode)
    with pytest.raises(KeyboardInterrupt):
        pruned.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory


def test_interrupted_overwrite_keeps_the_old_save(pruned, tmp_path, monkeypatch):
    out = pruned.save_pretrained(tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(type(pruned.tokenizer), "save_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pruned.save_pretrained(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_non_empty_target_needs_overwrite(pruned, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="overwrite=True"):
        pruned.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").is_file()
    pruned.save_pretrained(tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_staging_left_by_a_dead_process_of_this_host_is_removed(tmp_path):
    import os

    from optimum_admm.files import host_name as _host
    from optimum_admm.files import staged_directory

    target = tmp_path / "model"
    dead = tmp_path / f".model.tmp-{_host()}-999999999-abc"  # beyond any pid_max: no such process
    alive = tmp_path / f".model.tmp-{_host()}-{os.getppid()}-def"  # the process that runs the tests
    other_host = tmp_path / ".model.tmp-otherhost-999999999-ghi"  # a shared file system: not ours to judge
    unrelated = tmp_path / f".modelx.tmp-{_host()}-999999999-jkl"
    backup = tmp_path / f".model.old-{_host()}-999999999"  # a previous output moved aside: maybe the only copy
    for path in (dead, alive, other_host, unrelated, backup):
        path.mkdir()
        (path / "shard.safetensors").write_bytes(b"partial")
    with staged_directory(target) as staging:
        assert f"-{_host()}-{os.getpid()}-" in staging.name
        (staging / "config.json").write_text("{}")
    assert not dead.exists()
    assert alive.exists() and other_host.exists() and unrelated.exists() and backup.exists()
    assert (target / "config.json").is_file()


def test_a_local_save_card_names_its_own_directory_in_the_usage_snippet(pruned, tmp_path):
    target = tmp_path / "tiny-admm-50"
    pruned.save_pretrained(target)
    card = (target / "README.md").read_text()
    assert f'from_pretrained("{target}")' in card
    assert 'from_pretrained("model-admm-unstructured-50")' not in card
