"""Perplexity: windows, BOS handling, dataset kinds and input validation, checked against a plain loop."""

from __future__ import annotations

import math

import pytest
import torch

from optimum_admm.evaluation import PerplexityResult, perplexity, plan_windows, tokenize_dataset

LINES = [
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse,",
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part.",
    "def add(a, b):\n    return a + b\n\nclass Whale:\n    pass\n",
    "The State of the Union is strong. We have met in a time of testing for the country and for the world.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(LINES * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _llama(len(tokenizer))


def _plain_loop_nll(model, ids: list[int], window: int, bos: int | None) -> tuple[float, int]:
    """Summed NLL and token count over non-overlapping windows, one token at a time."""
    total, count = 0.0, 0
    content = window - (bos is not None)
    for begin in range(0, len(ids), content):
        row = ([bos] if bos is not None else []) + ids[begin : begin + content]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([row])).logits[0].double(), dim=-1)
        for position in range(1, len(row)):
            total -= float(log_probs[position - 1, row[position]])
            count += 1
    return total, count


@pytest.mark.parametrize("add_bos", [False, True])
def test_perplexity_matches_plain_loop(model, tokenizer, add_bos):
    ids = tokenizer("\n\n".join(LINES), add_special_tokens=False)["input_ids"]
    total, count = _plain_loop_nll(model, ids, 16, tokenizer.bos_token_id if add_bos else None)
    result = perplexity(model, tokenizer, LINES, sequence_length=16, add_bos=add_bos)
    assert isinstance(result, PerplexityResult)
    assert result.num_tokens == count
    assert result.num_windows == math.ceil(len(ids) / (16 - add_bos))
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_every_token_scored_once_with_bos(model, tokenizer):
    ids = tokenize_dataset(tokenizer, LINES)
    assert perplexity(model, tokenizer, LINES, sequence_length=16, add_bos=True).num_tokens == len(ids)
    assert perplexity(model, tokenizer, LINES, sequence_length=16, stride=5, add_bos=False).num_tokens == len(ids) - 1


def test_stride_scores_only_new_tokens(model, tokenizer):
    ids = tokenize_dataset(tokenizer, LINES)[:40]
    total, count = 0.0, 0
    for begin, end, first in plan_windows(len(ids), 16, 6, add_bos=False):
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].double(), dim=-1)
        for position in range(first, end):
            total -= float(log_probs[position - begin - 1, ids[position]])
            count += 1
    result = perplexity(model, tokenizer, LINES, sequence_length=16, stride=6, max_tokens=40, add_bos=False)
    assert result.num_tokens == count == 39
    assert result.nll == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize(
    ("num_tokens", "content", "stride"), [(1, 4, 4), (2, 4, 4), (10, 4, 4), (23, 8, 3), (9, 9, 1)]
)
def test_plan_windows_scores_each_token_at_most_once(num_tokens, content, stride, add_bos):
    scored = []
    for begin, end, first in plan_windows(num_tokens, content, stride, add_bos):
        assert end - begin <= content
        assert begin + (0 if add_bos else 1) <= first < end
        scored.extend(range(first, end))
    assert len(scored) == len(set(scored))
    if add_bos:
        assert sorted(scored) == list(range(num_tokens))
    elif stride < content:  # overlapping windows give every token after the first some context
        assert sorted(scored) == list(range(1, num_tokens))


def test_batches_and_dataset_kinds_agree(model, tokenizer, tmp_path):
    import datasets

    reference = perplexity(model, tokenizer, LINES, sequence_length=16)
    batched = perplexity(model, tokenizer, LINES, sequence_length=16, batch_size=3)
    from_dataset = perplexity(model, tokenizer, datasets.Dataset.from_dict({"text": LINES}), sequence_length=16)
    (tmp_path / "text.txt").write_text("\n\n".join(LINES))
    from_file = perplexity(model, tokenizer, str(tmp_path / "text.txt"), sequence_length=16)  # a string is a path
    for other in (batched, from_dataset, from_file):
        assert other.num_tokens == reference.num_tokens
        assert other.perplexity == pytest.approx(reference.perplexity, rel=1e-5)


def test_a_text_passed_as_a_string_is_refused_as_in_prune(model, tokenizer):
    """One rule for prune() and perplexity(): a string names a dataset or a file; a text goes in a list."""
    from optimum_admm.errors import InvalidArgumentError

    text = "\n\n".join(LINES) * 20
    with pytest.raises(InvalidArgumentError, match=r"put it in a list: \[text\]") as info:
        perplexity(model, tokenizer, text, sequence_length=16)
    assert len(str(info.value)) < 300  # never echoed whole


def test_max_tokens_caps_the_stream(model, tokenizer):
    result = perplexity(model, tokenizer, LINES, sequence_length=16, max_tokens=20, add_bos=False)
    assert (result.num_tokens, result.num_windows) == (18, 2)


def test_model_is_left_in_its_mode(model, tokenizer):
    model.train()
    perplexity(model, tokenizer, LINES[:1], sequence_length=16)
    assert model.training
    model.eval()


def test_gemma_gets_bos_by_default(tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=8,
        max_position_embeddings=256,
    )
    gemma = Gemma3ForCausalLM(config).eval()
    default = perplexity(gemma, tokenizer, LINES, sequence_length=16)
    with_bos = perplexity(gemma, tokenizer, LINES, sequence_length=16, add_bos=True)
    assert default == with_bos
    assert default.num_tokens == len(tokenize_dataset(tokenizer, LINES))


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"sequence_length": 1}, "sequence_length"),
        ({"sequence_length": 16.0}, "sequence_length"),
        ({"stride": 0}, "stride"),
        ({"stride": 16, "add_bos": True}, "stride"),
        ({"max_tokens": 1}, "max_tokens"),
        ({"batch_size": 0}, "batch_size"),
        ({"dataset": 42}, "dataset"),
        ({"dataset": ["text", 3]}, "dataset"),
        ({"dataset": ""}, "dataset"),
    ],
)
def test_bad_arguments_name_the_parameter(model, tokenizer, kwargs, parameter):
    arguments = {"dataset": LINES, "sequence_length": 16, **kwargs}
    with pytest.raises(ValueError, match=parameter):
        perplexity(model, tokenizer, **arguments)


def test_dataset_without_text_column(model, tokenizer):
    import datasets

    with pytest.raises(ValueError, match="dataset must have a 'text' column"):
        perplexity(model, tokenizer, datasets.Dataset.from_dict({"content": LINES}), sequence_length=16)


def test_add_bos_without_bos_token(model, tokenizer):
    from transformers import PreTrainedTokenizerFast

    no_bos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="add_bos"):
        perplexity(model, no_bos, LINES, sequence_length=16, add_bos=True)


def test_perplexity_of_a_disk_offloaded_model_equals_in_memory(tmp_path, tokenizer, corpus_text):
    """Models larger than the device are evaluated block by block through accelerate's offload hooks."""
    from accelerate import dispatch_model
    from conftest import build_tiny_model

    from optimum_admm.evaluation import perplexity

    model = build_tiny_model("llama")
    expected = perplexity(model, tokenizer, [corpus_text], sequence_length=64, max_tokens=512)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    offloaded = dispatch_model(build_tiny_model("llama"), device_map=device_map, offload_dir=str(tmp_path))
    assert offloaded.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    result = perplexity(offloaded, tokenizer, [corpus_text], sequence_length=64, max_tokens=512)
    assert result.num_tokens == expected.num_tokens
    assert abs(result.perplexity - expected.perplexity) < 1e-4 * expected.perplexity


@pytest.mark.parametrize("switch", ["transformers", "environment"])
def test_the_global_progress_bar_switches_silence_every_bar(switch, tokenizer, corpus_text, monkeypatch, capsys):
    from conftest import build_tiny_model
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from optimum_admm import ADMMConfig, ADMMPruner

    if switch == "transformers":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
        disable_progress_bars()  # what the variable does when huggingface_hub is imported
    try:
        assert are_progress_bars_disabled()
        model = build_tiny_model("llama")
        pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=ADMMConfig(num_samples=2,
                                                                                          sequence_length=16))  # fmt: skip
        pruner.prune([corpus_text])  # show_progress left at its default
        perplexity(model, tokenizer, [corpus_text[:2000]], sequence_length=32)
        err = capsys.readouterr().err
        assert "Pruning (admm)" not in err and "perplexity" not in err
    finally:
        enable_progress_bars()
        if switch == "transformers":
            hf_logging.enable_progress_bar()
    pruner.prune([corpus_text])
    assert "Pruning (admm)" in capsys.readouterr().err  # and they show again once switched back on


def test_log_lines_are_never_glued_onto_the_progress_bar(tokenizer, corpus_text, capsys):
    import logging
    import sys

    from conftest import build_tiny_model

    from optimum_admm import ADMMConfig, ADMMPruner

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    logger = logging.getLogger("optimum_admm")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        model = build_tiny_model("llama")
        config = ADMMConfig(num_samples=2, sequence_length=16)
        ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=config).prune([corpus_text], show_progress=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    lines = [line for line in capsys.readouterr().err.split("\n") if "LOG block 0: mean relative error" in line]
    assert lines, "the driver logs each block"
    assert all(line.split("\r")[-1].startswith("LOG block 0") for line in lines), lines  # not after the bar's text
