"""One driver over a weight store: every place weights live prunes alike; stores, statistics, output, identity."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from accelerate.hooks import attach_align_device_hook_on_blocks
from accelerate.utils import OffloadedWeightsLoader
from conftest import assert_pruned_alike, build_tiny_model, interrupt_at_block
from test_offload import _device_map
from transformers import AutoModelForCausalLM

import optimum_admm.streaming as streaming
from optimum_admm import ADMMConfig, ADMMPruner, PruningConfig, WandaConfig
from optimum_admm.evaluation import perplexity
from optimum_admm.export import load_masks
from optimum_admm.modeling import find_decoder_blocks
from optimum_admm.stats import GramAccumulator, InputNormAccumulator
from optimum_admm.stores import InMemoryStore, OffloadedStore, input_device, store_for
from optimum_admm.streaming import prune_checkpoint

FAST = {"num_samples": 4, "sequence_length": 32, "seed": 1}


def _block_weights(model) -> dict[str, torch.Tensor]:
    store = store_for(model)
    blocks_name, blocks = find_decoder_blocks(model)
    store.bind(blocks_name, blocks)
    return {k: v.clone() for i in range(len(blocks)) for k, v in store.block_tensors(i).items()}


def _cpu_offloaded_blocks(model, offloaded: set[int]):
    """What ``dispatch_model`` builds for modules mapped to "cpu" on a GPU machine: their weights in a CPU state
    dict behind an ``OffloadedWeightsLoader``, ``meta`` in the model, loaded by the hooks at every forward."""
    blocks_name, blocks = find_decoder_blocks(model)
    names = [f"{blocks_name}.{i}" for i in offloaded]
    state = {k: v.clone() for k, v in model.state_dict().items() if any(k.startswith(f"{n}.") for n in names)}
    mapping = _device_map(model, offloaded=set())
    attach_align_device_hook_on_blocks(
        model,
        execution_device=dict.fromkeys(mapping, torch.device("cpu")),
        offload={name: name in names for name in mapping},
        weights_map=OffloadedWeightsLoader(state_dict=state),
    )
    return model


def _dispatch(kind: str, model, tmp_path):
    if kind == "disk":
        return dispatch_model(model, _device_map(model, offloaded={1}), offload_dir=str(tmp_path / "offload"))
    if kind == "cpu-map":
        return _cpu_offloaded_blocks(model, offloaded={0, 1})
    return cpu_offload(model, execution_device=torch.device("cpu"))  # accelerate's plain-dict weights map


@pytest.mark.parametrize("kind", ["disk", "cpu-map", "cpu_offload"])
@pytest.mark.parametrize(
    "config", [ADMMConfig(**FAST), WandaConfig(**FAST, mask_structure="2:4")], ids=["admm", "wanda"]
)
def test_every_kind_of_offload_prunes_bitwise_like_memory(kind, config, tokenizer, corpus_text, tmp_path):
    reference = build_tiny_model("llama")
    ADMMPruner.from_pretrained(reference, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    model = _dispatch(kind, build_tiny_model("llama"), tmp_path)
    assert isinstance(store_for(model), OffloadedStore)
    offloaded_block = model.model.layers[1]
    assert all(p.is_meta for p in offloaded_block.parameters())  # its weights live in a weights map
    if kind == "cpu_offload":
        assert next(model.parameters()).is_meta  # the first parameter itself is offloaded
    report = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=config).prune(
        [corpus_text], show_progress=False
    )
    assert report.sparsity == pytest.approx(0.5)
    ids = tokenizer(corpus_text[:300], return_tensors="pt")["input_ids"]
    assert_pruned_alike(reference, model, _block_weights, ids)


def test_save_masks_and_perplexity_on_a_model_whose_first_parameter_is_offloaded(tokenizer, corpus_text, tmp_path):
    config = ADMMConfig(**FAST)
    reference = build_tiny_model("llama")
    memory = ADMMPruner.from_pretrained(reference, tokenizer=tokenizer, config=config)
    memory.prune([corpus_text], show_progress=False)
    memory.save_pretrained(tmp_path / "memory", save_masks=True)

    model = build_tiny_model("llama")
    mapping = {**_device_map(model, offloaded={0, 1}), "model.embed_tokens": "disk"}
    model = dispatch_model(model, mapping, offload_dir=str(tmp_path / "offload"))
    assert next(model.parameters()).is_meta and input_device(model).type == "cpu"
    offloaded = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=config)
    offloaded.prune([corpus_text], show_progress=False)
    offloaded.save_pretrained(tmp_path / "offloaded", save_masks=True)  # was "Cannot copy out of meta tensor"

    expected, got = load_masks(tmp_path / "memory"), load_masks(tmp_path / "offloaded")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    text = corpus_text[:2000]
    dense_ppl = perplexity(reference, tokenizer, [text], sequence_length=32)
    offloaded_ppl = perplexity(model, tokenizer, [text], sequence_length=32)
    assert offloaded_ppl.perplexity == pytest.approx(dense_ppl.perplexity, rel=1e-6)


def test_evaluate_tasks_on_a_model_whose_first_parameter_is_offloaded(tokenizer, tmp_path, monkeypatch):
    import sys
    import types

    from optimum_admm import lm_eval_bridge

    model = build_tiny_model("llama")
    mapping = {**_device_map(model, offloaded={0}), "model.embed_tokens": "disk"}
    model = dispatch_model(model, mapping, offload_dir=str(tmp_path / "offload"))
    assert next(model.parameters()).is_meta
    seen = {}

    class FakeHFLM:  # lm-eval's wrapper: what matters here is the device the bridge gives it
        def __init__(self, **kwargs):
            seen["device"] = kwargs["device"]

    fake = {name: types.ModuleType(name) for name in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface")}
    fake["lm_eval.tasks"] = types.ModuleType("lm_eval.tasks")
    fake["lm_eval"].simple_evaluate = lambda **kwargs: {"results": {"task": {"acc": 0.5, "alias": "task"}}}
    fake["lm_eval.models.huggingface"].HFLM = FakeHFLM
    fake["lm_eval.tasks"].TaskManager = lambda **kwargs: None
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    assert lm_eval_bridge.evaluate_tasks(model, tokenizer, ["task"]) == {"task": {"acc": 0.5}}
    assert seen["device"] == "cpu"  # the embedding's execution device, not "meta"


def test_stores_are_chosen_by_where_the_weights_live(tmp_path):
    model = build_tiny_model("llama")
    assert isinstance(store_for(model), InMemoryStore)
    dispatched = dispatch_model(model, _device_map(model, offloaded={1}), offload_dir=str(tmp_path / "offload"))
    store = store_for(dispatched)
    assert isinstance(store, OffloadedStore)
    name = "model.layers.1.mlp.down_proj.weight"
    assert dispatched.get_submodule("model.layers.1.mlp.down_proj").weight.is_meta
    assert store.read(name).shape == (32, 64) and not store.read(name).is_meta


def _save_source(family, tokenizer, path):
    build_tiny_model(family).save_pretrained(path, max_shard_size="20KB")
    tokenizer.save_pretrained(path)


def test_streaming_output_copies_an_allow_list_and_writes_its_own_card(tokenizer, corpus_text, tmp_path):
    source = tmp_path / "source"
    _save_source("llama", tokenizer, source)
    torch.save({"stale": torch.ones(2)}, source / "pytorch_model.bin")  # a dense copy in another format
    (source / "README.md").write_text("---\nlicense: mit\n---\n# The dense base model's card\n")
    (source / "notes.txt").write_text("not a tokenizer file")
    evaluated = []

    def evaluate(staging):
        evaluated.append(sorted(p.name for p in staging.iterdir()))
        return {"heldout": 12.5}

    result = prune_checkpoint(
        source, tmp_path / "out", ADMMConfig(**FAST), [corpus_text], show_progress=False, evaluate=evaluate
    )
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "pytorch_model.bin" not in names and "notes.txt" not in names
    assert {"config.json", "tokenizer.json", "pruning_config.json", "README.md"} <= names
    card = (tmp_path / "out" / "README.md").read_text()
    assert "dense base model's card" not in card and "admm" in card.lower()
    sidecar = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert sidecar["evaluation"]["heldout"]["perplexity"] == 12.5  # written before the rename, not patched after
    assert "model.safetensors.index.json" in evaluated[0] and "pruning_config.json" not in evaluated[0]
    assert result.evaluation == {"heldout": 12.5}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.pruning["method"] == "admm" and loaded.config.pruning["sidecar"] == "pruning_config.json"


def test_streaming_timings_add_up_with_a_slow_disk(tokenizer, corpus_text, tmp_path, monkeypatch):
    source = tmp_path / "source"
    _save_source("llama", tokenizer, source)
    real, delay, calls = streaming._load_tensors, 0.05, []

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(delay)
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "_load_tensors", slow)
    started = time.perf_counter()
    result = prune_checkpoint(source, tmp_path / "out", ADMMConfig(**FAST), [corpus_text], show_progress=False)
    wall = time.perf_counter() - started
    injected = delay * len(calls)
    assert len(calls) >= 5  # early modules, each block in the capture and in the loop, the rest
    parts = result.load_seconds + result.compute_seconds + result.write_seconds
    assert parts == pytest.approx(result.report.total_seconds, rel=1e-9) and parts <= wall
    assert result.load_seconds >= injected  # every slow read is load time...
    assert result.compute_seconds <= wall - injected  # ...and none of it is counted as compute as well
    assert result.report.forward_seconds + result.report.solve_seconds <= result.compute_seconds


def test_resume_refuses_a_model_that_differs_in_one_block(tokenizer, corpus_text, tmp_path, monkeypatch):
    def prune(model, checkpoint):
        pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=ADMMConfig(**FAST))
        return pruner.prune([corpus_text], show_progress=False, checkpoint_dir=checkpoint)

    checkpoint = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        interrupt_at_block(patch, block=1)
        with pytest.raises(KeyboardInterrupt):
            prune(build_tiny_model("llama"), checkpoint)
    for block in (0, 1):  # a restored block, and the next one
        other = build_tiny_model("llama")
        with torch.no_grad():
            other.model.layers[block].mlp.up_proj.weight[0, 0] += 1.0  # same names, shapes and embedding
        with pytest.raises(ValueError, match=rf"decoder block {block} \(model\.layers\.{block}\) has other weights"):
            prune(other, checkpoint)
    resumed = build_tiny_model("llama")
    prune(resumed, checkpoint)  # the same model still resumes
    reference = build_tiny_model("llama")
    prune(reference, None)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in reference.state_dict().items())


def test_streaming_resume_refuses_a_checkpoint_that_differs_in_one_block(
    tokenizer, corpus_text, tmp_path, monkeypatch
):
    source, other = tmp_path / "source", tmp_path / "other"
    _save_source("llama", tokenizer, source)
    model = build_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(2)
    model.save_pretrained(other, max_shard_size="20KB")
    tokenizer.save_pretrained(other)
    checkpoint = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        interrupt_at_block(patch, block=1)
        with pytest.raises(KeyboardInterrupt):
            prune_checkpoint(source, tmp_path / "out", ADMMConfig(**FAST), [corpus_text], checkpoint_dir=checkpoint)
    with pytest.raises(ValueError, match=r"decoder block 0 \(model\.layers\.0\) has other weights"):
        prune_checkpoint(other, tmp_path / "out", ADMMConfig(**FAST), [corpus_text], checkpoint_dir=checkpoint)
    assert not (tmp_path / "out").exists()


def test_a_resumed_checkpoint_keeps_no_stale_activations(tokenizer, corpus_text, tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    config = ADMMConfig(**FAST)
    with monkeypatch.context() as patch:
        interrupt_at_block(patch, block=2)
        with pytest.raises(KeyboardInterrupt):
            ADMMPruner.from_pretrained(build_tiny_model("gemma3-sliding"), tokenizer=tokenizer, config=config).prune(
                [corpus_text], show_progress=False, checkpoint_dir=checkpoint
            )
    assert sorted(p.name for p in checkpoint.glob("inputs-*")) == ["inputs-00002.safetensors"]
    ADMMPruner.from_pretrained(build_tiny_model("gemma3-sliding"), tokenizer=tokenizer, config=config).prune(
        [corpus_text], show_progress=False, checkpoint_dir=checkpoint
    )
    assert not list(checkpoint.glob("inputs-*"))  # the last block's inputs are not needed once it is done


def test_methods_get_exactly_the_statistic_they_declare(tokenizer, corpus_text, monkeypatch):
    from optimum_admm import registry

    made = []
    for cls in (GramAccumulator, InputNormAccumulator):
        monkeypatch.setattr(cls, "__init__", _recording(cls.__init__, made, cls.__name__))
    for config, kind in ((WandaConfig(**FAST), "InputNormAccumulator"), (ADMMConfig(**FAST), "GramAccumulator")):
        made.clear()
        model = build_tiny_model("llama")
        report = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=config).prune(
            [corpus_text], show_progress=False
        )
        assert made and set(made) == {kind}, config.method
        # one per distinct input per block: q/k/v share one, gate/up share one -> 4 per block
        assert len(made) == 4 * len(model.model.layers)
        assert all(r.num_tokens == 4 * 32 for r in report.layers)
    spec = registry.get_spec(WandaConfig())
    assert spec.statistic_name == "input_norms" and spec.needs_calibration
    assert registry.get_spec(ADMMConfig()).statistic_name == "gram"


def _recording(init, made, name):
    def wrapped(self, *args, **kwargs):
        made.append(name)
        init(self, *args, **kwargs)

    return wrapped


def test_wanda_on_input_norms_equals_wanda_on_the_gram_diagonal():
    from optimum_admm.algorithms import wanda_mask

    torch.manual_seed(0)
    weight, x = torch.randn(16, 64), torch.randn(200, 64) * torch.linspace(0.1, 4, 64)
    norms, gram = InputNormAccumulator(64), GramAccumulator(64)
    norms.add(x)
    gram.add(x)
    assert norms.value.shape == (64,)  # O(in), not O(in^2)
    assert torch.allclose(norms.value, gram.value.diagonal(), rtol=1e-5)
    for nm in (None, (2, 4)):
        assert torch.equal(wanda_mask(weight, norms.value, 0.5, nm=nm), wanda_mask(weight, gram.value, 0.5, nm=nm))


@pytest.fixture
def isolated_registry(monkeypatch):
    from optimum_admm import configuration, registry

    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    monkeypatch.setattr(configuration, "_CONFIG_CLASSES", dict(configuration._CONFIG_CLASSES))
    return registry


def test_a_name_is_registered_once_and_subclasses_load_their_own_recipes(isolated_registry):
    registry = isolated_registry

    @dataclass
    class InheritedName(ADMMConfig):  # inherits method = "admm"
        pass

    with pytest.raises(ValueError, match=r"method 'admm' is registered already \(by ADMMConfig\)"):
        registry.register_method(InheritedName, registry.get_method(ADMMConfig()))

    @dataclass
    class MyADMMConfig(ADMMConfig):
        method: ClassVar[str] = "my-admm"

    registry.register_method(MyADMMConfig, registry.get_method(ADMMConfig()))
    with pytest.raises(ValueError, match="method 'my-admm' is registered already"):
        registry.register_method(MyADMMConfig, registry.get_method(ADMMConfig()))
    assert type(PruningConfig.from_dict(ADMMConfig().to_dict())) is ADMMConfig  # not taken over by the subclass
    assert type(PruningConfig.from_dict(MyADMMConfig(sparsity=0.3).to_dict())) is MyADMMConfig
    with pytest.raises(ValueError, match=r"method='admm' is invalid for MyADMMConfig; allowed: 'my-admm'"):
        MyADMMConfig.from_dict(ADMMConfig().to_dict())

    @dataclass
    class NoDataADMMConfig(ADMMConfig):
        method: ClassVar[str] = "no-data-admm"

    with pytest.raises(ValueError, match=r"statistic=None contradicts \S*NoDataADMMConfig.needs_calibration=True"):
        registry.register_method(NoDataADMMConfig, registry.get_method(ADMMConfig()), statistic=None)


def test_a_registered_config_with_a_required_field_prunes(isolated_registry, tokenizer, corpus_text):
    registry = isolated_registry

    @dataclass(kw_only=True)
    class ScaledConfig(PruningConfig):
        method: ClassVar[str] = "scaled"
        scale: float  # required: the driver must not build a default instance

    def keep_largest_input_norms(weight, norms, config):
        assert norms.dim() == 1
        threshold = (weight.abs() * norms.sqrt() * config.scale).median()
        return weight.abs() * norms.sqrt() * config.scale > threshold

    registry.register_method(
        ScaledConfig,
        lambda w, s, c: w.masked_fill(~keep_largest_input_norms(w, s, c), 0),
        mask_fn=keep_largest_input_norms,
        statistic="input_norms",
    )
    report = ADMMPruner.from_pretrained(build_tiny_model("llama"), tokenizer=tokenizer, config=ScaledConfig(scale=2.0))
    result = report.prune([corpus_text[:4000]], show_progress=False)
    assert 0.4 < result.sparsity < 0.6


def test_a_custom_statistic_factory_is_what_the_method_receives(isolated_registry, tokenizer, corpus_text):
    registry = isolated_registry

    class TokenCounter:
        def __init__(self, in_features, device):
            self.num_tokens = 0

        def add(self, inputs):
            self.num_tokens += inputs.reshape(-1, inputs.shape[-1]).shape[0]

        @property
        def value(self):
            return self.num_tokens

    seen = []

    @dataclass
    class CountingConfig(WandaConfig):
        method: ClassVar[str] = "counting"

    def prune(weight, count, config):
        from optimum_admm.algorithms import magnitude_prune

        seen.append(count)
        return magnitude_prune(weight, config.sparsity)

    registry.register_method(CountingConfig, prune, statistic=TokenCounter)
    ADMMPruner.from_pretrained(build_tiny_model("llama"), tokenizer=tokenizer, config=CountingConfig(**FAST)).prune(
        [corpus_text], show_progress=False
    )
    assert seen and set(seen) == {4 * 32}


def test_memory_benchmark_runs_at_tiny_size_and_compares_the_statistics(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "memory.py"
    output = tmp_path / "memory.json"
    sizes = ["--hidden", "128", "--intermediate", "256", "--layers", "2", "--vocab", "512", "--num-samples", "2",
             "--sequence-length", "16"]  # fmt: skip
    subprocess.run(
        [sys.executable, str(script), *sizes, "--workdir", str(tmp_path / "work"), "--output", str(output)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    results = json.loads(output.read_text())
    runs = {(run["statistic"], bool(run["allocator_env"])): run for run in results["runs"]}
    assert set(runs) == {("input_norms", False), ("input_norms", True), ("gram", False)}
    assert results["statistics_gb"]["input_norms"] < results["statistics_gb"]["gram"]
    for run in runs.values():
        assert run["sparsity"] == pytest.approx(0.5)
        assert sum(run["time_split"].values()) == pytest.approx(1.0, rel=1e-6)
