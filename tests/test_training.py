"""Sparse fine-tuning: the Trainer callback, the plain-PyTorch guard and the sparsity-keeping LoRA merge."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from conftest import GLOO_ENVIRONMENT, build_tiny_model, torchrun_command
from torch import nn

from optimum_admm import ADMMConfig, ADMMPruner
from optimum_admm.training import (
    SparsityGuard,
    SparsityPreservingCallback,
    apply_masks_,
    canonical_name,
    keep_sparse,
    masks_from_model,
)

HAS_PEFT = importlib.util.find_spec("peft") is not None
SEQ = 32


@pytest.fixture(scope="module")
def pruned_state(tokenizer, corpus_text):
    """A tiny LLaMA pruned to 50% with ADMM *inside the script that holds it* (state dict, reused per test)."""
    model = build_tiny_model("llama")
    config = ADMMConfig(sparsity=0.5, num_samples=4, sequence_length=SEQ)
    report = ADMMPruner(model=model, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}, report


@pytest.fixture
def pruned_model(pruned_state):
    model = build_tiny_model("llama")
    model.load_state_dict(pruned_state[0])
    return model


@pytest.fixture(scope="module")
def train_data(tokenizer, corpus_text):
    ids = tokenizer(corpus_text, return_tensors="pt")["input_ids"][0]
    windows = ids[: (len(ids) // SEQ) * SEQ].view(-1, SEQ)[:32]
    return [{"input_ids": w, "labels": w} for w in windows]


def mean_loss(model, data) -> float:
    model.eval()
    with torch.no_grad():
        ids = torch.stack([row["input_ids"] for row in data])
        return float(model(input_ids=ids, labels=ids).loss)


def run_trainer(model, data, tmp_path, callbacks, **overrides):
    from transformers import Trainer, TrainingArguments

    kwargs = {
        "output_dir": str(tmp_path),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "weight_decay": 0.1,
        "warmup_steps": 0,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 4,
        "disable_tqdm": True,
        "seed": 0,
    }
    trainer = Trainer(model=model, args=TrainingArguments(**{**kwargs, **overrides}), train_dataset=data)
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def pruned_nonzero(model, masks) -> int:
    """How many entries that ``masks`` mark as pruned are non-zero in ``model``."""
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    return sum(int((params[name].detach()[~mask] != 0).sum()) for name, mask in masks.items())


# --- masks and the plain-PyTorch API ------------------------------------------------------------------------------


def test_masks_from_model_hand_computed():
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 4.0]]))
        model[0].bias.zero_()  # a bias is never masked
    masks = masks_from_model(model)
    assert list(masks) == ["0.weight"]  # the dense second layer gets no mask
    assert masks["0.weight"].tolist() == [[False, True, False, True], [True, False, False, True]]
    assert masks_from_model(model, min_sparsity=0.5) == {}  # exactly 50% zeros is not above 0.5


def test_apply_masks_explicit_dict_hand_computed():
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 9.0).view(1, 8))
    keep = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0]])  # 0/1 integers are accepted as well as bools
    assert apply_masks_(model, {"0": keep}) == 4  # module name, without ".weight"
    assert model[0].weight.tolist() == [[1.0, 0.0, 3.0, 0.0, 5.0, 0.0, 7.0, 0.0]]
    assert apply_masks_(model, {"0.weight": keep.bool()}) == 0


def test_tied_weights_bind_under_either_name():
    embedding = nn.Embedding(6, 4)
    head = nn.Linear(4, 6, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embed": embedding, "head": head})
    keep = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    assert apply_masks_(model, {"head.weight": keep}) == int((~keep).sum())
    assert torch.equal(embedding.weight != 0, keep)


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        ({"0.weight": torch.ones(3, 3, dtype=torch.bool)}, "shape"),
        ({"missing.weight": torch.ones(2, 2, dtype=torch.bool)}, "match no parameter"),
        ({"0.weight": torch.full((2, 2), 0.5)}, "only 0 and 1"),
        ({"0.weight": [[1, 0], [0, 1]]}, "torch.Tensor"),
        ([torch.ones(2, 2)], "dict"),
    ],
)
def test_bad_masks_raise(masks, match):
    with pytest.raises(ValueError, match=match):
        apply_masks_(nn.Sequential(nn.Linear(2, 2)), masks)


@pytest.mark.parametrize("value", [-0.1, 1.0, "0.5", True])
def test_bad_min_sparsity_raises(value):
    with pytest.raises(ValueError, match="min_sparsity"):
        masks_from_model(nn.Linear(2, 2), min_sparsity=value)
    with pytest.raises(ValueError, match="min_sparsity"):
        SparsityPreservingCallback(min_sparsity=value)


def test_callback_rejects_a_path_for_masks():
    with pytest.raises(ValueError, match="from_saved"):
        SparsityPreservingCallback(masks="some/dir")


def test_canonical_names_match_through_wrappers():
    name = "module._orig_mod.base_model.model.model.layers.1.mlp.down_proj.base_layer.weight"
    assert canonical_name(name) == "model.layers.1.mlp.down_proj.weight"
    assert canonical_name("model.layers.0._checkpoint_wrapped_module.mlp.weight") == "model.layers.0.mlp.weight"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_keep_sparse_custom_loop_with_autocast_scaler_and_accumulation(pruned_model, train_data, dtype):
    masks = masks_from_model(pruned_model)
    assert len(masks) == 14  # 7 linears in each of 2 blocks
    pruned_model.train()
    optimizer = torch.optim.AdamW(pruned_model.parameters(), lr=5e-3, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    with keep_sparse(pruned_model, optimizer=optimizer) as guard:
        for step in range(3):
            for micro in range(2):  # gradient accumulation over two micro-batches
                batch = torch.stack(
                    [r["input_ids"] for r in train_data[8 * step + 4 * micro : 8 * step + 4 * micro + 4]]
                )
                with torch.autocast("cpu", dtype=dtype):
                    loss = pruned_model(input_ids=batch, labels=batch).loss / 2
                scaler.scale(loss).backward()
                for name, param in pruned_model.named_parameters():  # masked before reaching .grad
                    if name in masks:
                        assert not param.grad[~masks[name]].any(), name
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        assert guard.num_violations() == 0
        for name, param in pruned_model.named_parameters():  # Adam moments of pruned weights stay zero too
            if name in masks:
                for value in optimizer.state[param].values():
                    if value.shape == param.shape:
                        assert not value[~masks[name]].any(), name
    assert not guard.is_attached
    assert pruned_nonzero(pruned_model, masks) == 0
    assert all(not p._backward_hooks for p in pruned_model.parameters())


# DDP runs in real ``torchrun`` subprocesses with a timeout (gloo over 127.0.0.1 only). These tests used to create a
# gloo group inside the pytest process (and ``mp.spawn`` children of it); that hung intermittently in the full suite,
# where the long-lived test process had already started thread pools, data-loader workers and other process groups
# before the rendezvous. A fresh process per launch has none of that, and a stuck launch fails at the timeout instead
# of hanging the suite.
DDP_WORKER = Path(__file__).parent / "ddp_worker.py"


def _torchrun_ddp(nproc: int, out: Path, mode: str) -> list[dict]:
    command = torchrun_command(nproc, DDP_WORKER, str(out), mode)
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **GLOO_ENVIRONMENT}, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(nproc)]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="this torch build has no gloo backend")
def test_keep_sparse_under_ddp(pruned_model, train_data, tmp_path):
    """One-process gloo DDP: the hooks run before the reducer, so the all-reduced gradient is already masked."""
    masks = masks_from_model(pruned_model)
    batches = [torch.stack([r["input_ids"] for r in train_data[4 * step : 4 * step + 4]]) for step in range(3)]
    torch.save({"state": pruned_model.state_dict(), "batches": batches}, tmp_path / "input.pt")
    before = {k: v.clone() for k, v in pruned_model.state_dict().items()}
    (result,) = _torchrun_ddp(1, tmp_path, "model")
    assert result["num_pruned"] == sum(int((~m).sum()) for m in masks.values())
    pruned_model.load_state_dict(result["state"])
    assert pruned_nonzero(pruned_model, masks) == 0
    assert any(not torch.equal(v, result["state"][k]) for k, v in before.items())  # it trained


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="this torch build has no gloo backend")
def test_keep_sparse_two_process_ddp(tmp_path):
    """Two gloo ranks on different data: both keep the zeros and stay identical replicas."""
    first, second = _torchrun_ddp(2, tmp_path, "toy")
    assert first["violations"] == second["violations"] == 0
    for name, value in first["state"].items():
        assert torch.equal(value, second["state"][name]), name
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model.load_state_dict(first["state"])
    assert pruned_nonzero(model, first["masks"]) == 0
    assert all((model.get_parameter(name)[mask] != 0).all() for name, mask in first["masks"].items())


def test_guard_reapplies_after_an_optimizer_that_moves_zero_gradient_weights():
    """An update that moves weights without any gradient (here: a negative weight-decay-like step) is undone."""

    class Drift(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(0.01)
            return super().step(closure)

    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    apply_masks_(model, {"0.weight": torch.eye(4, dtype=torch.bool)})
    optimizer = Drift(model.parameters(), lr=0.1)
    with keep_sparse(model, optimizer=optimizer) as guard:
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        assert guard.num_violations() == 0
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # detached: the drift now fills the pruned weights
    assert SparsityGuard(model, {"0.weight": torch.eye(4, dtype=torch.bool)}).num_violations() == 12


# --- the Trainer callback -----------------------------------------------------------------------------------------


def test_trainer_callback_keeps_zeros_and_loss_goes_down(pruned_model, train_data, tmp_path):
    masks = masks_from_model(pruned_model)
    before = {n: p.detach().clone() for n, p in pruned_model.named_parameters()}
    loss_before = mean_loss(pruned_model, train_data)
    callback = SparsityPreservingCallback()
    trainer = run_trainer(pruned_model, train_data, tmp_path, [callback])
    assert trainer.state.global_step == 6
    assert pruned_nonzero(pruned_model, masks) == 0
    assert mean_loss(pruned_model, train_data) < loss_before - 0.1
    for name, mask in masks.items():  # the kept weights did train
        assert not torch.equal(dict(pruned_model.named_parameters())[name][mask], before[name][mask]), name
    assert {k: v.tolist() for k, v in callback.masks.items()} == {k: v.tolist() for k, v in masks.items()}
    state = trainer.optimizer.optimizer.state if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.state
    for name, param in pruned_model.named_parameters():
        if name in masks:
            assert not state[param]["exp_avg"][~masks[name]].any(), name
            assert not state[param]["exp_avg_sq"][~masks[name]].any(), name
    assert all(not p._backward_hooks for p in pruned_model.parameters())


def test_same_run_without_callback_refills_pruned_weights(pruned_model, train_data, tmp_path):
    masks = masks_from_model(pruned_model)
    num_pruned = sum(int((~m).sum()) for m in masks.values())
    run_trainer(pruned_model, train_data, tmp_path, [])
    assert pruned_nonzero(pruned_model, masks) > 0.9 * num_pruned


@pytest.mark.parametrize(
    "overrides",
    [
        {"bf16": True},
        {"gradient_checkpointing": True, "gradient_accumulation_steps": 2, "max_grad_norm": 0.5},
    ],
    ids=["bf16-autocast", "accumulation-checkpointing-clipping"],
)
def test_trainer_callback_keeps_pattern_under(pruned_model, train_data, tmp_path, overrides):
    masks = masks_from_model(pruned_model)
    loss_before = mean_loss(pruned_model, train_data)
    run_trainer(pruned_model, train_data, tmp_path, [SparsityPreservingCallback()], max_steps=4, **overrides)
    assert pruned_nonzero(pruned_model, masks) == 0
    assert mean_loss(pruned_model, train_data) < loss_before


def test_callback_falls_back_to_masking_grad_when_hooks_are_bypassed(caplog):
    """An engine that computes gradients without the tensor hooks: the first step notices and masks ``.grad``."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    keep = torch.eye(4, dtype=torch.bool)
    callback = SparsityPreservingCallback({"0.weight": keep})
    callback.on_train_begin(None, None, None, model=model)
    callback.guard.detach()  # what a sharded engine amounts to: the hooks never fire
    model(torch.randn(2, 4)).sum().backward()
    with caplog.at_level("WARNING", logger="optimum_admm.training.callback"):
        callback.on_pre_optimizer_step(None, None, None)
    assert "bypassed" in caplog.text
    assert not model[0].weight.grad[~keep].any()


def test_trainer_callback_with_explicit_masks_on_a_dense_model(train_data, tmp_path):
    model = build_tiny_model("llama")
    weight = model.model.layers[0].mlp.down_proj.weight
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.7
    masks = {"model.layers.0.mlp.down_proj.weight": keep}
    run_trainer(model, train_data, tmp_path, [SparsityPreservingCallback(masks)], max_steps=3)
    assert pruned_nonzero(model, masks) == 0
    assert int((weight != 0).sum()) == int(keep.sum())
    assert masks_from_model(model).keys() == masks.keys()


def test_from_saved_masks_round_trip(pruned_model, pruned_state, tokenizer, train_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from optimum_admm import export

    if not hasattr(export, "load_masks"):
        with pytest.raises(ImportError, match="load_masks"):
            SparsityPreservingCallback.from_saved(tmp_path)
        pytest.skip("optimum_admm.export.load_masks is not available")
    pruner = ADMMPruner(model=pruned_model, tokenizer=tokenizer, config=ADMMConfig(sparsity=0.5))
    pruner.report = pruned_state[1]  # the report of the pruning run that produced pruned_model
    pruner.save_pretrained(tmp_path / "saved", save_masks=True)
    masks = masks_from_model(pruned_model)
    callback = SparsityPreservingCallback.from_saved(tmp_path / "saved")
    assert {k: v.tolist() for k, v in callback.masks.items()} == {k: v.tolist() for k, v in masks.items()}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    run_trainer(reloaded, train_data, tmp_path / "run", [callback], max_steps=2)
    assert pruned_nonzero(reloaded, masks) == 0


# --- PEFT / LoRA --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_lora_train_and_merge_keeps_pattern(pruned_model, train_data, tmp_path):
    from peft import LoraConfig, get_peft_model

    from optimum_admm.training import lora_merge_fill, merge_lora_sparse

    masks = masks_from_model(pruned_model)
    peft_model = get_peft_model(
        pruned_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    assert masks_from_model(peft_model).keys() == masks.keys()  # lora_B starts at zero but is never masked
    loss_before = mean_loss(peft_model, train_data)
    with pytest.warns(UserWarning, match="merge_lora_sparse"):
        run_trainer(peft_model, train_data, tmp_path, [SparsityPreservingCallback()], max_steps=6, learning_rate=2e-2)
    assert mean_loss(peft_model, train_data) < loss_before
    assert pruned_nonzero(peft_model, masks) == 0  # base weights untouched
    filled = lora_merge_fill(peft_model)
    assert filled > 0
    lora_logits = peft_model(input_ids=train_data[0]["input_ids"][None]).logits
    merged = merge_lora_sparse(peft_model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert pruned_nonzero(merged, masks) == 0
    assert masks_from_model(merged).keys() == masks.keys()
    merged_logits = merged(input_ids=train_data[0]["input_ids"][None]).logits
    assert (merged_logits - lora_logits).abs().max() < 1.0  # close to base + adapters, not equal


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_lora_plain_merge_warns_and_fills(pruned_model):
    from peft import LoraConfig, get_peft_model

    from optimum_admm.training import merge_lora_sparse

    masks = masks_from_model(pruned_model)
    peft_model = get_peft_model(pruned_model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.warns(UserWarning, match="filled"):
        merged = merge_lora_sparse(peft_model, keep_sparsity=False)
    q_masks = {k: v for k, v in masks.items() if "q_proj" in k}
    assert pruned_nonzero(merged, q_masks) == sum(int((~m).sum()) for m in q_masks.values())
    with pytest.raises(ValueError, match="PEFT model"):
        merge_lora_sparse(merged)


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_untrained_lora_merge_is_silent(pruned_model):
    from peft import LoraConfig, get_peft_model

    from optimum_admm.training import merge_lora_sparse

    masks = masks_from_model(pruned_model)
    peft_model = get_peft_model(pruned_model, LoraConfig(r=2, target_modules=["q_proj"]))  # B = 0: nothing to fill
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = merge_lora_sparse(peft_model, keep_sparsity=False)
    assert pruned_nonzero(merged, masks) == 0
