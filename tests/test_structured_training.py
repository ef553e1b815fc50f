"""ShearingTrainer and ShearingCallback: three parameter groups, shape logging, gates saved, shear() end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, make_text
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_admm.structured import ShearingConfig, ShearingModule
from optimum_admm.structured.api import pack_tokens, shear
from optimum_admm.structured.training import ShearingCallback, ShearingTrainer

TARGET = ShearingConfig(
    num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32
)


@pytest.fixture(scope="module")
def train_data(tokenizer):
    return pack_tokens(make_text(3000, seed=5).splitlines(), tokenizer, sequence_length=16, max_sequences=64)


def _args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = {
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "learning_rate": 1e-3,
    }
    return TrainingArguments(output_dir=str(tmp_path), **{**defaults, **kwargs})


def test_shearing_trainer_three_groups_logs_and_saves(tmp_path, train_data):
    model = build_tiny_model("mistral-gqa")
    trainer = ShearingTrainer(
        model=model,
        args=_args(tmp_path, gradient_accumulation_steps=2),
        shearing_config=TARGET,
        train_dataset=train_data,
    )
    before = {k: p.detach().clone() for k, p in trainer.shearing.gates.log_alpha.items()}
    trainer.train()
    groups = trainer.optimizer.param_groups
    gate_ids = {id(p) for p in trainer.shearing.gates.parameters()}
    lambda_ids = {id(p) for p in trainer.shearing.lagrangian.parameters()}
    assert len(groups) == 4  # the Trainer's weight groups (decay / no decay), gate logits, multipliers
    assert [g["initial_lr"] for g in groups if {id(p) for p in g["params"]} in (gate_ids, lambda_ids)] == [1.0, 1.0]
    assert trainer.shearing.penalty_scale == 0.5
    assert any(not torch.equal(before[k], p) for k, p in trainer.shearing.gates.log_alpha.items())
    assert trainer.shearing.lagrangian.values()["lambda_2/layer"] > 0
    logged = [entry for entry in trainer.state.log_history if "shear/expected/num_hidden_layers" in entry]
    assert len(logged) == 2
    for key in (
        "shear/target/hidden_size",
        "shear/lambda_1/head",
        "shear/binary/intermediate",
        "shear/expected_sparsity/hidden",
    ):
        assert key in logged[-1]
    trainer.save_model(str(tmp_path / "ckpt"))
    restored = ShearingModule.from_model(model, TARGET)
    restored.load(tmp_path / "ckpt")
    torch.testing.assert_close(restored.gates.log_alpha["head"], trainer.shearing.gates.log_alpha["head"])


def test_callback_form_on_a_plain_trainer(tmp_path, train_data):
    model = build_tiny_model("qwen2")
    shearing = ShearingModule.from_model(model, TARGET)
    callback = ShearingCallback(shearing)
    before = shearing.gates.log_alpha["intermediate"].detach().clone()
    Trainer(model=model, args=_args(tmp_path), train_dataset=train_data, callbacks=[callback]).train()
    assert shearing.attached and callback.optimizer is not None
    assert not torch.equal(before, shearing.gates.log_alpha["intermediate"])
    assert len(callback.history) == 2 and "shear/expected/intermediate_size" in callback.history[0]
    shearing.detach()


def test_shear_end_to_end_writes_a_standard_model(tmp_path, train_data):
    result = shear(
        build_tiny_model("llama"),
        ShearingConfig(num_hidden_layers=1, intermediate_size=32),
        train_data,
        max_steps=3,
        output_dir=tmp_path,
        per_device_train_batch_size=4,
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
    )
    assert result.model.config.num_hidden_layers == 1 and len(result.history) == 3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.intermediate_size == 32
    assert (tmp_path / "shearing_config.json").exists() and (tmp_path / "shearing_state.pt").exists()
