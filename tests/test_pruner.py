"""ADMMPruner end to end over tiny random models of every supported family."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model
from optimum.quantization_base import OptimumQuantizer
from torch import nn

from optimum_admm import ADMMConfig, ADMMPruner
from optimum_admm.masks import is_valid_nm, num_pruned
from optimum_admm.modeling import find_decoder_blocks, get_weight_matrix

FAST = {"num_samples": 4, "sequence_length": 32}


def prune(model, tokenizer, text, **config):
    pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=ADMMConfig(**{**FAST, **config}))
    return pruner, pruner.prune(calibration_dataset=[text], show_progress=False)


def logits(model, tokenizer, text):
    ids = tokenizer(text[:400], return_tensors="pt")["input_ids"][:, :48]
    with torch.no_grad():
        return model(input_ids=ids).logits


def hook_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not getattr(m, "_forward_hooks_with_kwargs", {})
        for m in model.modules()
    )


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_every_family_end_to_end(tiny_model_name, tokenizer, corpus_text, structure):
    model = build_tiny_model(tiny_model_name)
    untouched = {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if "embed" in name or "wte" in name or "wpe" in name or "lm_head" in name
    }
    assert untouched
    pruner, report = prune(model, tokenizer, corpus_text, sparsity=0.5, mask_structure=structure)
    assert pruner.model is model
    blocks_name, blocks = find_decoder_blocks(model)
    linears = [m for b in blocks for m in b.modules() if hasattr(m, "weight") and m.weight.dim() == 2]
    assert len(report.layers) == len(linears) > 0
    for row in report.layers:
        module = model.get_submodule(row.name)
        weight = get_weight_matrix(module)
        assert int((weight == 0).sum()) == num_pruned(weight.numel(), 0.5), row.name
        assert row.relative_error is not None and 0 <= row.relative_error < 1
        assert row.num_tokens == FAST["num_samples"] * FAST["sequence_length"]
        if structure == "2:4":
            assert is_valid_nm(weight, 2, 4), row.name
    for name, before in untouched.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    assert torch.isfinite(logits(model, tokenizer, corpus_text)).all()
    assert no_hooks(model)
    assert not model.training


def test_zero_sparsity_leaves_logits_unchanged(tokenizer, corpus_text):
    model = build_tiny_model("llama")
    before = logits(model, tokenizer, corpus_text)
    prune(model, tokenizer, corpus_text, sparsity=0.0)
    assert torch.equal(logits(model, tokenizer, corpus_text), before)


def test_same_seed_gives_identical_weights(tokenizer, corpus_text):
    first, second = build_tiny_model("mistral-gqa"), build_tiny_model("mistral-gqa")
    prune(first, tokenizer, corpus_text, seed=3)
    prune(second, tokenizer, corpus_text, seed=3)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    third = build_tiny_model("mistral-gqa")
    prune(third, tokenizer, corpus_text, seed=4)
    assert not torch.equal(third.model.layers[0].mlp.up_proj.weight, first.model.layers[0].mlp.up_proj.weight)


def test_true_sequential_prunes_group_by_group(tokenizer, corpus_text):
    model = build_tiny_model("llama")
    reference = copy.deepcopy(model)
    _, report = prune(model, tokenizer, corpus_text, true_sequential=True)
    _, plain = prune(reference, tokenizer, corpus_text)
    assert [r.name for r in report.layers] == [r.name for r in plain.layers]
    assert report.sparsity == pytest.approx(0.5)
    # q/k/v read the same input in both modes, so block 0's first group is identical; o_proj sees pruned v.
    layer = model.model.layers[0]
    assert torch.equal(layer.self_attn.q_proj.weight, reference.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(layer.self_attn.o_proj.weight, reference.model.layers[0].self_attn.o_proj.weight)


def test_shared_inputs_share_one_gram(tokenizer, corpus_text, monkeypatch):
    from optimum_admm import stats

    created = []
    original = stats.GramAccumulator.__init__

    def counting_init(self, *args, **kwargs):
        created.append(args[0])
        original(self, *args, **kwargs)

    monkeypatch.setattr(stats.GramAccumulator, "__init__", counting_init)
    model = build_tiny_model("llama")
    prune(model, tokenizer, corpus_text)
    # per block: [q,k,v], [o], [gate,up], [down]
    assert created == [32, 32, 32, 64] * 2


def test_targets_and_ignore(tokenizer, corpus_text):
    model = build_tiny_model("llama")
    up_before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    _, report = prune(model, tokenizer, corpus_text, targets=["re:.*self_attn\\..*"], ignore=["k_proj"])
    names = {r.name.split(".")[-1] for r in report.layers}
    assert names == {"q_proj", "v_proj", "o_proj"}
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, up_before)


def test_is_an_optimum_quantizer_and_quantize_saves(tmp_path, tokenizer, corpus_text):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model("qwen2")
    pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=ADMMConfig(**FAST))
    assert isinstance(pruner, OptimumQuantizer)
    report = pruner.quantize(tmp_path / "out", calibration_dataset=[corpus_text], show_progress=False)
    assert report.sparsity == pytest.approx(0.5)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "pruning_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, param in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], param), name
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_from_pretrained_loads_a_local_checkpoint(tmp_path, tokenizer, corpus_text):
    model = build_tiny_model("llama")
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    pruner = ADMMPruner.from_pretrained(tmp_path / "dense", config=ADMMConfig(**FAST))
    report = pruner.prune(calibration_dataset=[corpus_text], save_dir=tmp_path / "sparse", show_progress=False)
    assert report.sparsity == pytest.approx(0.5)
    source = ADMMPruner.from_pretrained(tmp_path / "dense").model  # the source checkpoint is untouched
    assert torch.equal(source.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(pruner.model.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_existing_save_dir_needs_overwrite_before_any_work(tmp_path, tokenizer, corpus_text):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    model = build_tiny_model("llama")
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=ADMMConfig(**FAST))
    with pytest.raises(ValueError, match="overwrite=True"):
        pruner.prune(calibration_dataset=[corpus_text], save_dir=tmp_path / "out")
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)
    pruner.prune(calibration_dataset=[corpus_text], save_dir=tmp_path / "out", overwrite=True, show_progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists()


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_model_without_decoder_blocks_fails_fast():
    with pytest.raises(ValueError, match="no decoder blocks"):
        ADMMPruner.from_pretrained(_NoBlocks())


def test_target_that_matches_nothing_fails_fast():
    with pytest.raises(ValueError, match="'nonexistent_proj' matches no module"):
        ADMMPruner.from_pretrained(build_tiny_model("llama"), config=ADMMConfig(targets=["nonexistent_proj"]))
    with pytest.raises(ValueError, match="select no linear layer"):
        ADMMPruner.from_pretrained(build_tiny_model("llama"), config=ADMMConfig(ignore=["Linear"]))


def test_nm_needs_divisible_layers():
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match="in_features divisible by M=64"):
        ADMMPruner.from_pretrained(model, config=ADMMConfig(mask_structure="2:64"))


def test_bad_config_fails_before_loading(monkeypatch):
    import transformers

    def explode(*args, **kwargs):  # pragma: no cover - must never be called
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", explode)
    with pytest.raises(ValueError, match="config of type dict"):
        ADMMPruner.from_pretrained("some/model", config={"sparsity": 0.5})
    with pytest.raises(ValueError, match="sparsity=1.5"):
        ADMMPruner.from_pretrained("some/model", config=ADMMConfig(sparsity=1.5))


def test_short_calibration_text_fails_before_any_forward(tokenizer):
    model = build_tiny_model("llama")
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=ADMMConfig(**FAST))
    with pytest.raises(ValueError, match="too short: .* sequence_length=32"):
        pruner.prune(calibration_dataset=["the whale"])
    with pytest.raises(ValueError, match="calibration_dataset=None"):
        pruner.prune()
    assert calls == []


def test_trust_remote_code_is_off_by_default(monkeypatch, tmp_path):
    import transformers

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    build_tiny_model("llama").save_pretrained(tmp_path)  # a real checkpoint: the source checks pass
    with pytest.raises(RuntimeError, match="stop here"):
        ADMMPruner.from_pretrained(tmp_path)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


def test_block_inputs_replay_the_model_exactly(tiny_model_name, tokenizer, corpus_text):
    """Captured per-block arguments (masks, rotary tables, positions) reproduce the model's own hidden states,
    including models whose blocks get different arguments (Gemma 3: sliding-window and global layers)."""
    from optimum_admm.sequential import _capture_inputs, _run_block

    model = build_tiny_model(tiny_model_name)
    ids = tokenizer(corpus_text[:2000], return_tensors="pt")["input_ids"][:, :64].reshape(2, 32)
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
        hooks_before = hook_counts(model)  # transformers keeps its own output-capturing hooks
        _, blocks = find_decoder_blocks(model)
        inputs = _capture_inputs(model, blocks, list(ids.split(1)), torch.device("cpu"))
        for index in range(len(blocks)):
            torch.testing.assert_close(torch.cat(inputs.hidden), expected[index], rtol=1e-5, atol=1e-5)
            inputs.hidden = list(_run_block(blocks[index], inputs, index, torch.device("cpu"), torch.device("cpu")))
    assert hook_counts(model) == hooks_before


def test_block_arguments_agree_within_float_rounding_only():
    """Rotary tables recomputed per sample may differ in the last bit (threaded BLAS); anything more is refused."""
    from optimum_admm.sequential import _same

    cos = torch.linspace(-1, 1, 64).reshape(1, 8, 8)
    assert _same(
        ((), {"position_embeddings": (cos, cos)}), ((), {"position_embeddings": (cos.nextafter(cos + 1), cos)})
    )
    assert not _same(((), {"position_embeddings": (cos, cos)}), ((), {"position_embeddings": (cos + 1e-3, cos)}))
    positions = torch.arange(8)[None]
    assert not _same(((), {"position_ids": positions}), ((), {"position_ids": positions + 1}))
    assert not _same(((), {"position_ids": positions}), ((), {"position_ids": positions.float()}))


def test_dtype_and_torch_dtype_load_the_same_model(tmp_path, tokenizer):
    build_tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    new = ADMMPruner.from_pretrained(tmp_path, dtype=torch.bfloat16).model
    old = ADMMPruner.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).model
    assert new.dtype == old.dtype == torch.bfloat16
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in new.state_dict().items())


def test_linear_subclasses_match_the_linear_target():
    """Falcon's FalconLinear subclasses nn.Linear: the class-name target "Linear" matches along the hierarchy."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=320))
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(1))
    report = ADMMPruner.from_pretrained(model, config=ADMMConfig(num_samples=4, sequence_length=32)).prune(
        ids, show_progress=False
    )
    names = {row.name.rsplit(".", 1)[-1] for row in report.layers}
    assert names == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} and len(report.layers) == 8
    for block in model.transformer.h:
        weight = block.mlp.dense_4h_to_h.weight
        assert int((weight == 0).sum()) == weight.numel() // 2


def test_a_targeted_linear_that_gets_no_input_is_named_before_its_block_changes_and_left_dense(monkeypatch):
    """A linear the forward never calls (or whose weight is read functionally) is found by the input capture's dense
    forward, named in one warning before any weight changes, left dense and listed in the report; the rest of the
    model is pruned (it used to raise after every block was pruned in place)."""
    import warnings

    from conftest import build_tiny_model

    model = build_tiny_model("llama")
    for block in model.model.layers:
        block.mlp.unused = torch.nn.Linear(32, 32, bias=False)  # registered, never called
    first_gate = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
    seen = []
    real_warn = warnings.warn

    def spy(message, *args, **kwargs):
        if "receive no input" in str(message):
            changed = not torch.equal(model.model.layers[0].mlp.gate_proj.weight, first_gate)
            seen.append((str(message), changed))
        return real_warn(message, *args, **kwargs)

    monkeypatch.setattr(warnings, "warn", spy)
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(1))
    pruner = ADMMPruner.from_pretrained(model, config=ADMMConfig(num_samples=4, sequence_length=32))
    with pytest.warns(UserWarning, match="receive no input"):
        report = pruner.prune(ids, show_progress=False)
    assert "model.layers.0.mlp.unused" in seen[0][0] and seen[0][1] is False  # said before block 0 changed
    assert "model.layers.1.mlp.unused" in seen[0][0] and len(seen) == 1  # every block's, once, before any work
    assert set(report.left_dense) == {f"model.layers.{i}.mlp.unused" for i in range(2)}
    assert all((block.mlp.unused.weight != 0).all() for block in model.model.layers)
    gate = model.model.layers[1].mlp.gate_proj.weight
    assert int((gate == 0).sum()) == gate.numel() // 2


def test_bidirectional_models_are_refused_before_any_work(tmp_path, tokenizer, corpus_text):
    """A bare BERT encoder passed as a model, and a BERT checkpoint (which transformers loads as BertLMHeadModel
    with a new, random head), are refused with one clear error, their weights untouched."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from optimum_admm.errors import InvalidArgumentError

    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=320
    )
    torch.manual_seed(0)
    encoder = BertModel(config)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match="model=BertModel is not a causal language model"):
        ADMMPruner.from_pretrained(encoder, tokenizer=tokenizer, config=ADMMConfig(num_samples=2, sequence_length=32)
                                   ).prune([corpus_text], show_progress=False)  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    pruner = ADMMPruner.from_pretrained(str(tmp_path / "bert"), tokenizer=tokenizer,
                                        config=ADMMConfig(num_samples=2, sequence_length=32))  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="model=BertLMHeadModel is not a causal language model"):
        pruner.prune([corpus_text], show_progress=False)


def test_report_accounts_for_every_parameter_of_the_model_by_kind():
    """The honest total: the share of all the model's parameters that was zeroed, by kind."""
    from conftest import build_tiny_model

    model = build_tiny_model("llama")
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(1))
    report = ADMMPruner.from_pretrained(model, config=ADMMConfig(num_samples=4, sequence_length=32)).prune(
        ids, show_progress=False
    )
    counts = report.parameters
    assert sum(entry["total"] for entry in counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["attention"]["zeros"] == counts["attention"]["total"] // 2  # q/k/v/o weights, no biases
    assert counts["mlp"]["zeros"] == counts["mlp"]["total"] // 2
    assert counts["outside blocks"]["zeros"] == 0 and counts["outside blocks"]["total"] > 0  # embeddings, head
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert report.model_fraction_pruned == pytest.approx(zeros / sum(p.numel() for p in model.parameters()), abs=1e-3)
    assert report.model_fraction_pruned < report.sparsity  # the layers' 50% is not the model's
    assert "zeroed" in report.summary() and "outside blocks 0.0%" in report.summary()
