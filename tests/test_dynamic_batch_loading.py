"""Dynamic batch loading: update rules by hand, sampler frequencies, weights in workers, exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, make_text

from optimum_admm.structured.dynamic_batch_loading import (
    DynamicBatchLoadingCallback,
    DynamicBatchLoadingConfig,
    MultiDomainDataset,
    PackedSequences,
    collate_packed,
    fit_scaling_law,
    paper_update,
    reference_code_update,
    scaling_law_reference_losses,
    tokenize_to_stream,
    update_domain_weights,
)

WEIGHTS = [0.5, 0.3, 0.2]
LOSSES = [3.0, 2.0, 1.5]
REFERENCE = [2.5, 2.2, 1.0]


def _domains(k: int = 4, tokens: int = 4000) -> dict[str, np.ndarray]:
    """Domain ``i`` holds token ids in ``[1000 i, 1000 i + 1000)``, so a sample's domain is ``id // 1000``."""
    return {f"d{i}": (1000 * i + np.arange(tokens) % 1000).astype(np.int64) for i in range(k)}


def _domain_of(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] // 1000).tolist()


# --------------------------------------------------------------------------------------------- rules
def test_paper_update_matches_hand_computation():
    # excess = max(l - l_ref, 0) = [0.5, 0, 0.5]; w * exp(excess), normalised.
    raw = [0.5 * math.exp(0.5), 0.3 * math.exp(0.0), 0.2 * math.exp(0.5)]
    expected = [x / sum(raw) for x in raw]
    assert paper_update(WEIGHTS, LOSSES, REFERENCE).tolist() == pytest.approx(expected, abs=1e-15)
    # With step size 2: exp(2 * excess).
    raw = [0.5 * math.exp(1.0), 0.3, 0.2 * math.exp(1.0)]
    assert paper_update(WEIGHTS, LOSSES, REFERENCE, step_size=2.0).tolist() == pytest.approx(
        [x / sum(raw) for x in raw], abs=1e-15
    )


def test_reference_code_update_matches_hand_computation():
    # excess = l - l_ref = [0.5, -0.2, 0.5] (not clipped); softmax(log w + 2 * excess); 0.9 * p + 0.1 / 3.
    raw = [0.5 * math.exp(1.0), 0.3 * math.exp(-0.4), 0.2 * math.exp(1.0)]
    expected = [0.9 * x / sum(raw) + 0.1 / 3 for x in raw]
    got = reference_code_update(WEIGHTS, LOSSES, REFERENCE, step_size=2.0, smoothing=0.1)
    assert got.tolist() == pytest.approx(expected, abs=1e-15)
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-15)
    # The unclipped rule takes weight from a domain below its reference; the paper rule only from its share.
    assert got[1] < 0.3 * 0.9 + 0.1 / 3


def test_constant_rule_and_bad_inputs():
    assert update_domain_weights([2, 6], [5.0, 1.0], [1.0, 1.0], rule="constant").tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match="rule"):
        update_domain_weights(WEIGHTS, LOSSES, REFERENCE, rule="doremi")
    with pytest.raises(ValueError, match="weights"):
        paper_update([-0.1, 1.1], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="same length"):
        paper_update(WEIGHTS, LOSSES, REFERENCE[:2])
    with pytest.raises(ValueError, match="losses"):
        paper_update(WEIGHTS, [1.0, float("nan"), 1.0], REFERENCE)
    with pytest.raises(ValueError, match="smoothing"):
        reference_code_update(WEIGHTS, LOSSES, REFERENCE, smoothing=1.0)
    with pytest.raises(ValueError, match="step_size"):
        paper_update(WEIGHTS, LOSSES, REFERENCE, step_size=0.0)


def test_scaling_law_fit_recovers_parameters():
    sizes = [5e7, 1.5e8, 4e8, 1e9, 3e9]
    losses = [400.0 * n**-0.3 + 1.7 for n in sizes]
    fit = fit_scaling_law(sizes, losses)
    assert fit.b == pytest.approx(0.3, rel=1e-3)
    assert fit.c == pytest.approx(1.7, abs=1e-3)
    assert fit.predict(7e9) == pytest.approx(400.0 * 7e9**-0.3 + 1.7, abs=1e-4)
    reference = scaling_law_reference_losses(sizes[:3], {"x": losses[:3], "y": [v + 1 for v in losses[:3]]}, 1e9)
    assert reference["y"] - reference["x"] == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match=">= 3"):
        fit_scaling_law(sizes[:2], losses[:2])
    with pytest.raises(ValueError, match="distinct"):
        fit_scaling_law([1e8, 1e8, 1e9], losses[:3])


def test_config_validation():
    assert DynamicBatchLoadingConfig(reference_losses={"a": 1}).reference_losses == {"a": 1.0}
    with pytest.raises(ValueError, match="rule"):
        DynamicBatchLoadingConfig(rule="doremi", reference_losses={"a": 1.0})
    with pytest.raises(ValueError, match="reference_losses"):
        DynamicBatchLoadingConfig(rule="paper")
    with pytest.raises(ValueError, match="reference_losses"):
        DynamicBatchLoadingConfig(reference_losses={"a": float("inf")})
    with pytest.raises(ValueError, match="smoothing"):
        DynamicBatchLoadingConfig(rule="constant", smoothing=-0.1)
    config = DynamicBatchLoadingConfig(rule="reference_code", reference_losses="first_evaluation", step_size=0.5)
    with pytest.warns(UserWarning, match="unknown"):
        assert DynamicBatchLoadingConfig.from_dict({**config.to_dict(), "future": 1}) == config


# --------------------------------------------------------------------------------------------- data
def test_tokenize_and_pack(tokenizer):
    import datasets

    docs = datasets.Dataset.from_dict({"text": ["Call me Ishmael.", "The union is strong."]})
    stream = tokenize_to_stream(docs, tokenizer)
    assert stream.dtype == np.int32
    assert (stream == tokenizer.eos_token_id).sum() == 2  # one separator after each document
    data = MultiDomainDataset({"a": docs, "b": list(range(40))}, sequence_length=4, tokenizer=tokenizer)
    assert data.num_sequences["b"] == 10
    assert collate_packed([next(iter(data))])["input_ids"].dtype == torch.int64
    assert len(PackedSequences(list(range(10)), 3)) == 3
    for bad in ({"domains": {}}, {"sequence_length": 1}, {"on_exhausted": "wrap"}, {"weights": {"a": 1.0}}):
        kwargs = {"domains": {"a": docs, "b": list(range(40))}, "sequence_length": 4, "tokenizer": tokenizer}
        with pytest.raises(ValueError, match=next(iter(bad))):
            MultiDomainDataset(**{**kwargs, **bad})


def test_sampler_frequencies_match_weights_chi_square():
    from scipy.stats import chisquare

    weights = np.array([0.5, 0.3, 0.15, 0.05])
    data = MultiDomainDataset(_domains(), sequence_length=8, weights=weights.tolist(), seed=1234)
    loader = torch.utils.data.DataLoader(data, batch_size=100, collate_fn=collate_packed)
    counts = np.zeros(4)
    for batch, _ in zip(loader, range(40), strict=False):
        counts += np.bincount(_domain_of(batch["input_ids"]), minlength=4)
    assert counts.sum() == 4000
    assert chisquare(counts, weights * counts.sum()).pvalue > 0.01
    # The test has power: the same counts reject a mixture only a little different.
    assert chisquare(counts, np.array([0.45, 0.33, 0.16, 0.06]) * counts.sum()).pvalue < 1e-3


def test_exhausted_domain_repeats_or_stops():
    domains = {"a": np.arange(16), "b": 1000 + np.arange(16)}
    repeat = MultiDomainDataset(domains, sequence_length=4, weights=[1, 0], shuffle=False)
    first = [s["input_ids"][0].item() for _, s in zip(range(8), repeat, strict=False)]
    assert first == [0, 4, 8, 12, 0, 4, 8, 12]
    stop = MultiDomainDataset(domains, sequence_length=4, weights=[1, 0], on_exhausted="stop")
    assert len(list(stop)) == 4
    assert stop.state_dict()["cursors"] == {"a": 4, "b": 0}


def test_weights_set_after_an_update_reach_two_workers():
    data = MultiDomainDataset(_domains(2), sequence_length=8, weights=[1.0, 0.0])
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, collate_fn=collate_packed)
    iterator = iter(loader)
    before = [_domain_of(next(iterator)["input_ids"]) for _ in range(4)]
    assert all(d == [0, 0, 0, 0] for d in before)
    data.set_weights({"d0": 0.0, "d1": 1.0})  # what DynamicBatchLoadingCallback does after an evaluation
    # Batches prefetched before the update may still come from d0 (at most prefetch_factor=2 per worker).
    after = [_domain_of(next(iterator)["input_ids"]) for _ in range(12)]
    assert all(d == [1, 1, 1, 1] for d in after[6:])
    # Both workers drew from d1: each stream's own cursor on d1 moved.
    cursors = data.state_dict()["stream_cursors"]
    assert len(cursors) == 2 and all(row[1] > 0 for row in cursors)
    del iterator


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_rewinds_prefetch_and_resumes_the_same_stream(num_workers):
    def make():
        return MultiDomainDataset(_domains(3), sequence_length=8, weights=[0.2, 0.3, 0.5], seed=7)

    def batches(data, count):
        loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=num_workers, collate_fn=collate_packed)
        return [b["input_ids"] for b, _ in zip(loader, range(count), strict=False)]

    reference = batches(make(), 10)
    first = make()
    head = batches(first, 5)  # the workers ran ahead while these 5 batches were taken
    state = json.loads(json.dumps(first.state_dict(consumed_batches=5, batch_size=3)))
    assert sum(state["cursors"].values()) == 15
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    tail = batches(resumed, 5)
    assert all(torch.equal(a, b) for a, b in zip(reference, head + tail, strict=True))
    other = MultiDomainDataset(_domains(3), sequence_length=16)
    with pytest.raises(ValueError, match="sequence_length"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------------------------- Trainer
def _trainer_run(tmp_path, tokenizer, max_steps, resume_from=None, seen=None):
    import datasets
    from transformers import Trainer, TrainerCallback, TrainingArguments

    texts = {name: make_text(1500, seed=i) for i, name in enumerate(["sotu", "code"])}
    train = MultiDomainDataset(
        {n: datasets.Dataset.from_dict({"text": t.splitlines()}) for n, t in texts.items()},
        sequence_length=16,
        tokenizer=tokenizer,
        weights={"sotu": 0.5, "code": 0.5},
    )
    validation = {
        n: PackedSequences(datasets.Dataset.from_dict({"text": [make_text(300, seed=10 + i)]}), 16, tokenizer)
        for i, n in enumerate(texts)
    }
    config = DynamicBatchLoadingConfig(reference_losses={"sotu": 5.0, "code": 5.4})
    callback = DynamicBatchLoadingCallback(train, config)
    probe_states = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            probe_states.append(train.state_dict())

    model = build_tiny_model("llama")
    if seen is not None:
        model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()) if module.training else None,
            with_kwargs=True,
        )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=3,
        ignore_data_skip=True,
        dataloader_num_workers=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collate_packed,
        callbacks=[callback, Probe()],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return callback, probe_states


def test_trainer_updates_weights_and_resume_restores_them_exactly(tmp_path, tokenizer):
    seen_full: list[torch.Tensor] = []
    full, _ = _trainer_run(tmp_path / "full", tokenizer, max_steps=6, seen=seen_full)
    assert [entry["step"] for entry in full.trajectory] == [0, 2, 4, 6]
    assert full.trajectory[-1]["weights"] != full.trajectory[0]["weights"]  # the rule moved them
    saved = json.loads((tmp_path / "full" / "checkpoint-3" / "trainer_state.json").read_text())
    saved = saved["stateful_callbacks"]["DynamicBatchLoadingCallback"]["attributes"]["data_state"]
    assert sum(saved["cursors"].values()) == 3 * 2  # 3 steps of 2 sequences, despite the workers' prefetching

    seen_resumed: list[torch.Tensor] = []
    resumed, probe_states = _trainer_run(
        tmp_path / "full",
        tokenizer,
        max_steps=6,
        resume_from=str(tmp_path / "full" / "checkpoint-3"),
        seen=seen_resumed,
    )
    assert probe_states[0] == saved  # weights, draw counters and cursors restored exactly
    # The resumed run sees exactly the batches of steps 4-6 of the uninterrupted run and ends in the same state.
    assert len(seen_resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(seen_full[3:], seen_resumed, strict=True))
    assert resumed.trajectory[-1]["weights"] == pytest.approx(full.trajectory[-1]["weights"], abs=1e-9)


def test_callback_requires_ignore_data_skip():
    data = MultiDomainDataset(_domains(2), sequence_length=8)
    callback = DynamicBatchLoadingCallback(data)

    class Args:
        ignore_data_skip = False

    with pytest.raises(ValueError, match="ignore_data_skip"):
        callback.on_init_end(Args(), None, None)
    with pytest.raises(ValueError, match="reference_losses"):
        DynamicBatchLoadingCallback(data, DynamicBatchLoadingConfig(reference_losses={"d0": 1.0}))
