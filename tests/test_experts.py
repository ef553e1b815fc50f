"""Fused mixture-of-experts weights are pruned per expert, calibrated on the tokens the router sends each expert."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB_SIZE
from tiny_configs import build

from optimum_admm import ADMMConfig, ADMMPruner, MagnitudeConfig, SparseGPTConfig, WandaConfig, sequential
from optimum_admm.experts import ExpertMatrix, find_experts, is_experts_module, routed_calibration
from optimum_admm.training import SparsityPreservingCallback, masks_from_model

FAST = {"num_samples": 4, "sequence_length": 32, "seed": 1}
#: The MoE families the issue names, one per expert layout (concatenated, interleaved and transposed with biases,
#: shared experts, dense first layers).
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "olmoe"]
METHODS = [ADMMConfig, SparseGPTConfig, WandaConfig, MagnitudeConfig]


def moe(model_type: str, seed: int = 0):
    return build(model_type, seed=seed, vocab_size=VOCAB_SIZE)


def expert_sets(model):
    blocks_name, blocks = sequential.find_decoder_blocks(model)
    return [s for i, block in enumerate(blocks) for s in find_experts(block, f"{blocks_name}.{i}")]


def nonzero_fraction(tensor: torch.Tensor) -> float:
    return float((tensor != 0).float().mean())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_routed_calibration_forward_equals_the_models_own(model_type):
    model = moe(model_type)
    sets = expert_sets(model)
    assert sets and all(is_experts_module(s.module) for s in sets)
    ids = torch.randint(0, VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        with routed_calibration(sets):
            routed = model(ids, use_cache=False).logits
        with routed_calibration(sets, all_tokens=True):  # statistics from every token, outputs still routed
            every = model(ids, use_cache=False).logits
        after = model(ids, use_cache=False).logits  # the model's own implementation is back
    torch.testing.assert_close(routed, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(every, reference, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, reference)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("config_class", METHODS, ids=lambda c: c.method)
def test_every_expert_matrix_is_pruned_to_the_target_and_routers_stay_dense(
    model_type, config_class, tokenizer, corpus_text
):
    model = moe(model_type)
    routers = {n: p.clone() for n, p in model.named_parameters() if ".gate." in f"{n}." or "router" in n}
    routers = {n: p for n, p in routers.items() if "gate_proj" not in n and "gate_up" not in n}
    assert routers
    config = config_class(sparsity=0.6, **FAST)
    report = ADMMPruner(model=model, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    rows = {row.name: row for row in report.layers}
    for experts in expert_sets(model):
        for name, matrix in experts.named_matrices():
            assert rows[name].sparsity == pytest.approx(0.6, abs=0.02), name
            assert nonzero_fraction(matrix.matrix()) == pytest.approx(0.4, abs=0.02), name
    for name, before in routers.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    assert report.parameters["experts"]["zeros"] > 0.55 * report.parameters["experts"]["total"]
    ids = torch.randint(0, VOCAB_SIZE, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_two_four_applies_to_each_expert_matrix_along_its_inputs(model_type, tokenizer, corpus_text):
    model = moe(model_type)
    config = ADMMConfig(mask_structure="2:4", **FAST)
    ADMMPruner(model=model, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    for experts in expert_sets(model):
        for name, matrix in experts.named_matrices():
            groups = (matrix.matrix() != 0).reshape(matrix.matrix().shape[0], -1, 4).sum(-1)
            assert bool((groups <= 2).all()), name


def _captured_statistics(monkeypatch):
    """The accumulators the driver hands to the solver, by layer name."""
    captured = {}
    real = sequential._solve_stage

    def spy(run, names, accumulators):
        captured.update(accumulators)
        return real(run, names, accumulators)

    monkeypatch.setattr(sequential, "_solve_stage", spy)
    return captured


def _routed_by_hand(model, batches, block: int = 0):
    """What reaches every expert of ``block`` in the dense model's own forward: ``{expert: (tokens, hidden)}``."""
    experts = model.model.layers[block].mlp.experts
    seen = []
    handle = experts.register_forward_pre_hook(lambda module, args: seen.append((args[0], args[1])))
    with torch.no_grad():
        for batch in batches:
            model(batch, use_cache=False)
    handle.remove()
    routed = {}
    for expert in range(experts.num_experts):
        rows = [x[(index == expert).any(-1)] for x, index in seen]
        tokens = torch.cat(rows)
        gate, up = torch.nn.functional.linear(tokens, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        routed[expert] = (tokens, experts.act_fn(gate) * up)
    return routed


def test_an_experts_gram_is_the_one_of_the_tokens_routed_to_it(monkeypatch):
    model = moe("mixtral")
    batches = [torch.randint(0, VOCAB_SIZE, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    routed = _routed_by_hand(model, batches)
    captured = _captured_statistics(monkeypatch)
    sequential.prune_model(model, ADMMConfig(**FAST), batches, show_progress=False)
    counts = []
    for expert, (tokens, hidden) in routed.items():
        name = f"model.layers.0.mlp.experts.{expert}"
        for role, inputs in (("gate_proj", tokens), ("up_proj", tokens), ("down_proj", hidden)):
            accumulator = captured[f"{name}.{role}"]
            assert accumulator.num_tokens == inputs.shape[0]
            torch.testing.assert_close(accumulator.gram, inputs.T @ inputs, rtol=1e-4, atol=1e-4)
        assert captured[f"{name}.gate_proj"] is captured[f"{name}.up_proj"]  # one statistic per shared input
        counts.append(tokens.shape[0])
    assert sum(counts) == 2 * 3 * 24 and len(set(counts)) > 1  # top-2 routing, experts get different tokens


def test_calibrate_all_experts_gives_every_expert_every_token(monkeypatch):
    model = moe("qwen3_moe")
    batches = [torch.randint(0, VOCAB_SIZE, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    captured = _captured_statistics(monkeypatch)
    report = sequential.prune_model(
        model, WandaConfig(calibrate_all_experts=True, **FAST), batches, show_progress=False
    )
    expert_rows = [name for name in captured if ".experts." in name]
    assert expert_rows and all(captured[name].num_tokens == 48 for name in expert_rows)
    assert not report.expert_fallbacks


def test_an_expert_no_token_reaches_is_calibrated_on_every_token_and_named(monkeypatch):
    model = moe("mixtral")
    experts = model.model.layers[0].mlp.experts

    def never_expert_3(module, args):  # a router that never picks expert 3 in block 0
        hidden, index, weights = args
        return hidden, torch.where(index == 3, (index + 1) % 3, index), weights

    experts.register_forward_pre_hook(never_expert_3)
    batches = [torch.randint(0, VOCAB_SIZE, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    captured = _captured_statistics(monkeypatch)
    report = sequential.prune_model(model, ADMMConfig(**FAST), batches, show_progress=False)
    unrouted = [f"model.layers.0.mlp.experts.3.{role}" for role in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(report.expert_fallbacks) == sorted(unrouted)
    assert all(captured[name].num_tokens == 48 for name in unrouted)
    rows = {row.name: row for row in report.layers}
    assert all(rows[name].sparsity == pytest.approx(0.5, abs=0.01) for name in unrouted)
    assert "received no routed token" in report.summary()


def test_prune_save_reload_finetune_keeps_every_pruned_expert_weight_at_zero(tokenizer, corpus_text, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = moe("qwen2_moe")
    pruner = ADMMPruner(model=model, tokenizer=tokenizer, config=ADMMConfig(**FAST))
    pruner.prune([corpus_text], show_progress=False)
    pruner.save_pretrained(tmp_path / "saved", save_masks=True)
    masks = masks_from_model(model)
    assert any(".experts.gate_up_proj" in name and mask.dim() == 3 for name, mask in masks.items())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, dict(model.named_parameters())[name]), name  # saved and reloaded exactly
    callback = SparsityPreservingCallback.from_saved(tmp_path / "saved")
    assert {k: v.tolist() for k, v in callback.masks.items()} == {k: v.tolist() for k, v in masks.items()}
    ids = tokenizer(corpus_text, return_tensors="pt")["input_ids"][0][: 16 * 32].view(16, 32)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in reloaded.named_parameters()}
    Trainer(model=reloaded, args=args, train_dataset=data, callbacks=[callback]).train()
    params = dict(reloaded.named_parameters())
    for name, keep in masks.items():
        assert not params[name].detach()[~keep].any(), name
    experts = [n for n in masks if ".experts." in n]
    assert any(not torch.equal(params[n][masks[n]], before[n][masks[n]]) for n in experts)  # kept weights trained


def test_expert_matrices_are_views_of_the_fused_layout_of_each_family():
    model = moe("gpt_oss")  # interleaved [gate0, up0, ...], stored transposed (E, in, out), with biases
    experts = model.model.layers[0].mlp.experts
    gate, up, down = (ExpertMatrix(experts, 2, role) for role in ("gate_proj", "up_proj", "down_proj"))
    assert torch.equal(gate.matrix(), experts.gate_up_proj[2][:, ::2].T)
    assert torch.equal(up.matrix(), experts.gate_up_proj[2][:, 1::2].T)
    assert torch.equal(down.matrix(), experts.down_proj[2].T)
    with torch.no_grad():
        up.matrix().zero_()  # a view: writes reach the fused parameter and nothing else
    assert not experts.gate_up_proj[2][:, 1::2].any() and experts.gate_up_proj[2][:, ::2].all()
    mixtral = moe("mixtral").model.layers[0].mlp.experts  # concatenated [gate; up], (E, out, in)
    size = mixtral.gate_up_proj.shape[1] // 2
    assert torch.equal(ExpertMatrix(mixtral, 1, "up_proj").matrix(), mixtral.gate_up_proj[1][size:])


def test_ignore_patterns_select_expert_matrices_by_name(tokenizer, corpus_text):
    model = moe("mixtral")
    down = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    config = WandaConfig(ignore=["lm_head", "re:.*experts\\.\\d+\\.down_proj"], **FAST)
    report = ADMMPruner(model=model, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj, down)
    assert any(".experts.0.gate_proj" in row.name for row in report.layers)
    assert not any(row.name.endswith("down_proj") and ".experts." in row.name for row in report.layers)


def test_a_disk_offloaded_moe_prunes_bitwise_like_the_in_memory_one(tokenizer, corpus_text, tmp_path):
    from accelerate import dispatch_model
    from test_offload import _device_map

    config = SparseGPTConfig(**FAST)
    reference = moe("qwen3_moe")
    ADMMPruner(model=reference, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    model = moe("qwen3_moe")
    model = dispatch_model(model, _device_map(model, offloaded={1}), offload_dir=str(tmp_path / "offload"))
    assert model.model.layers[1].mlp.experts.gate_up_proj.device.type == "meta"  # the experts live on disk
    report = ADMMPruner(model=model, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    assert any(".layers.1.mlp.experts." in row.name for row in report.layers)
    expected = {n: p for n, p in reference.state_dict().items()}
    from optimum_admm.stores import store_for

    store = store_for(model)
    for name, tensor in expected.items():
        assert torch.equal(store.read(name), tensor), name


def test_an_interrupted_moe_prune_resumes_bitwise_identical(tokenizer, corpus_text, tmp_path, monkeypatch):
    from conftest import interrupt_at_block

    config = ADMMConfig(**FAST)
    reference = moe("mixtral")
    ADMMPruner(model=reference, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    checkpoint = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        interrupt_at_block(patch, block=1)
        with pytest.raises(KeyboardInterrupt):
            ADMMPruner(model=moe("mixtral"), tokenizer=tokenizer, config=config).prune(
                [corpus_text], show_progress=False, checkpoint_dir=checkpoint
            )
    resumed = moe("mixtral")
    ADMMPruner(model=resumed, tokenizer=tokenizer, config=config).prune(
        [corpus_text], show_progress=False, checkpoint_dir=checkpoint
    )
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


@pytest.mark.parametrize("model_type", ["gemma4_text", "deepseek_v4"])
def test_block_arguments_that_depend_on_the_sample_are_captured_per_sample(model_type):
    """Gemma 4 gives every block a per-layer input computed from the tokens; DeepSeek-V4 passes the token ids for
    hash routing: each calibration sample's own arguments are replayed, not the first sample's."""
    model = moe(model_type)
    _, blocks = sequential.find_decoder_blocks(model)
    batches = [torch.randint(0, VOCAB_SIZE, (1, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    with torch.no_grad():
        inputs = sequential._capture_inputs(model, blocks, batches, torch.device("cpu"))
    assert inputs.per_sample is not None
    last = len(blocks) - 1
    for sample, batch in enumerate(batches):
        seen = {}
        handle = blocks[last].register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.update(kwargs=kwargs), with_kwargs=True
        )
        with torch.no_grad():
            model(batch, use_cache=False)
        handle.remove()
        args, kwargs = inputs.of(last, sample)
        varying = [k for k, v in kwargs.items() if not sequential._safe_same(v, inputs.of(last, 0)[1][k])]
        assert sample == 0 or varying, "the arguments of later samples differ from the first's"
        for key in varying:
            assert sequential._same(kwargs[key], seen["kwargs"][key]), (sample, key)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_streaming_a_sharded_moe_checkpoint_is_bitwise_identical_to_in_memory(
    model_type, tokenizer, corpus_text, tmp_path
):
    """The checkpoint stores experts one matrix per expert (transformers' saved layout); streaming builds each
    block's fused tensors from them as ``from_pretrained`` does, and writes the pruned block in the model's layout."""
    from transformers import AutoModelForCausalLM

    from optimum_admm.streaming import checkpoint_weight_map, prune_checkpoint

    source = tmp_path / "source"
    moe(model_type).save_pretrained(source, max_shard_size="100KB")
    tokenizer.save_pretrained(source)
    assert len(set(checkpoint_weight_map(source).values())) > 1  # really sharded
    config = ADMMConfig(**FAST)
    result = prune_checkpoint(source, tmp_path / "out", config, [corpus_text], show_progress=False)
    pruner = ADMMPruner.from_pretrained(str(source), config=config)
    expected_report = pruner.prune(calibration_dataset=[corpus_text], show_progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = pruner.model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert [r.relative_error for r in result.report.layers] == [r.relative_error for r in expected_report.layers]
    assert any(".experts." in row.name for row in result.report.layers)
