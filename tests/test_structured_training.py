"""ShearingTrainer and ShearingCallback: three parameter groups, shape logging, gates saved, shear() end to end."""

from __future__ import annotations

import json

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
    assert trainer.shearing.penalty_in_loss is False  # applied once per optimiser step by the callback
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
    assert reloaded.config.intermediate_size == 32 and reloaded.config.use_cache is True
    assert (tmp_path / "shearing_config.json").exists() and (tmp_path / "shearing_state.safetensors").exists()
    meta = json.loads((tmp_path / "pruning_config.json").read_text())
    assert meta["method"] == "sheared_llama" and meta["training"]["steps"] == 3
    assert [point["step"] for point in meta["gates"]["trajectory"]] == [1, 2, 3]
    assert (tmp_path / "README.md").is_file()


def test_result_save_pretrained_is_staged_warns_far_from_target_and_checks_first(tmp_path, train_data, caplog):
    import logging

    from huggingface_hub import ModelCard

    result = shear(
        build_tiny_model("llama"),
        ShearingConfig(num_hidden_layers=1, intermediate_size=32),
        train_data,
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        disable_tqdm=True,
    )
    with pytest.raises(ValueError, match="push_to_hub=True needs repo_id"):
        result.save_pretrained(tmp_path / "a", push_to_hub=True)
    with pytest.raises(ValueError, match=r"evaluation_results\['ppl'\]"):
        result.save_pretrained(tmp_path / "a", evaluation_results={"ppl": "low"})
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with caplog.at_level(logging.WARNING, logger="optimum_admm.structured.export"):
        path = result.save_pretrained(tmp_path / "a", evaluation_results={"wikitext2": 123.0}, license="mit")
    # two steps cannot move the gates to the target: said, with the numbers, and recorded in the sidecar
    assert "far from the target" in caplog.text and "num_hidden_layers 1.99" in caplog.text
    meta = json.loads((path / "pruning_config.json").read_text())
    assert set(meta["gates"]["far_from_target"]) >= {"num_hidden_layers", "intermediate_size"}
    card = ModelCard.load(path / "README.md")
    assert card.data.license == "mit" and card.data.eval_results[0].metric_value == 123.0
    with pytest.raises(ValueError, match="non-empty directory"):
        result.save_pretrained(path)


def test_shearing_config_is_strict_for_user_files_and_refuses_a_no_op_target(tmp_path):
    with pytest.raises(ValueError, match="no field 'num_hidden_layer'"):
        ShearingConfig.from_dict({"num_hidden_layer": 1}, strict=True)
    with pytest.warns(UserWarning, match="Ignoring unknown ShearingConfig keys"):
        ShearingConfig.from_dict({"num_hidden_layers": 1, "from_the_future": 3})
    with pytest.raises(ValueError, match="not a Sheared-LLaMA recipe"):
        ShearingConfig.from_dict({"method": "admm"})
    config = ShearingConfig(num_hidden_layers=1, lagrangian_warmup=0.5)
    config.save_pretrained(tmp_path)
    assert ShearingConfig.from_pretrained(tmp_path) == config
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match="nothing to prune"):
        ShearingModule.from_model(model, ShearingConfig(num_hidden_layers=2))
    with pytest.raises(ValueError, match="nothing to prune"):
        ShearingTrainer(model=model, args=_args(tmp_path), shearing_config=ShearingConfig())


def test_resume_from_checkpoint_restores_gates_and_multipliers(tmp_path, train_data):
    """Interrupted after step 2 and resumed from checkpoint-2, the run ends where the uninterrupted run ends."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    def run(output_dir, resume=None, callbacks=()):
        torch.manual_seed(0)
        trainer = ShearingTrainer(
            model=build_tiny_model("mistral-gqa"),
            args=_args(output_dir, max_steps=4, save_strategy="steps", save_steps=2, seed=0),
            shearing_config=TARGET,
            train_dataset=train_data,
            callbacks=list(callbacks),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    stopped = run(tmp_path / "stopped", callbacks=[StopAfter()])
    assert stopped.state.global_step == 2
    assert (tmp_path / "stopped" / "checkpoint-2" / "shearing_state.safetensors").is_file()
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "stopped" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    # Steps 3-4 move the gates and multipliers by ~1 (Adam at lr 1.0); a resume that lost them would be off by as
    # much. The resumed run matches up to the float noise that Adam at that rate amplifies.
    for name, value in full.shearing.state_dict().items():
        resumed_gap = (resumed.shearing.state_dict()[name] - value).abs().max().item()
        stopped_gap = (stopped.shearing.state_dict()[name] - value).abs().max().item()
        assert stopped_gap > 0.5, name
        assert resumed_gap < 0.25 * stopped_gap, (name, resumed_gap, stopped_gap)


def test_resume_from_a_checkpoint_without_gates_is_refused(tmp_path, train_data):
    plain = Trainer(
        model=build_tiny_model("mistral-gqa"),
        args=_args(tmp_path / "plain", max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=train_data,
    )
    plain.train()
    trainer = ShearingTrainer(
        model=build_tiny_model("mistral-gqa"),
        args=_args(tmp_path / "sheared", max_steps=4),
        shearing_config=TARGET,
        train_dataset=train_data,
    )
    with pytest.raises(ValueError, match="holds no shearing_state.safetensors"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))


def test_gate_and_multiplier_gradients_are_per_step(tmp_path, train_data):
    """Each optimiser step sees only its own step's gradient (the Trainer zeroes model gradients only)."""
    from transformers import TrainerCallback

    seen = []

    class Spy(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            lam = trainer.shearing.lagrangian.lambda_1["layer"]
            metrics = trainer.shearing.last_metrics
            gap = metrics["shear/expected_sparsity/layer"] - metrics["shear/target_sparsity/layer"]
            seen.append((float(lam.grad), gap))

    trainer = ShearingTrainer(
        model=build_tiny_model("mistral-gqa"),
        args=_args(tmp_path, max_steps=4, lr_scheduler_type="constant"),
        shearing_config=TARGET,
        train_dataset=train_data,
    )
    trainer.add_callback(Spy())  # after the shearing callback, which adds the Lagrangian's gradient before the step
    trainer.train()
    assert len(seen) == 4
    for grad, gap in seen:  # d/dlambda_1 of lambda_1 * (s - t), negated for ascent: this step's -(s - t)
        assert grad == pytest.approx(-gap, abs=1e-6)
