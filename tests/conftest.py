"""Shared fixtures: tiny random causal LMs built from configs, a tokenizer trained here, small text."""

from __future__ import annotations

import os
import random

import pytest
import torch

VOCAB_SIZE = 320

_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "not but they their one all new more been would who will about its after first two people year state union "
    "government congress nation public country great house law war peace trade money ship whale sea captain "
    "python function class module import return value list string file data time world"
).split()


def make_text(num_words: int = 4000, seed: int = 0) -> str:
    """Deterministic pseudo-English text (a Zipf-like draw over a fixed vocabulary), with paragraphs."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(_WORDS))]
    words = rng.choices(_WORDS, weights=weights, k=num_words)
    lines = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, num_words, 12)]
    return "\n".join(lines)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return make_text()


@pytest.fixture(scope="session")
def tokenizer(corpus_text):
    """A byte-level BPE tokenizer trained on the test text (vocabulary < VOCAB_SIZE)."""
    return build_tokenizer(corpus_text)


def build_tokenizer(corpus_text: str):
    """Train a byte-level BPE tokenizer on ``corpus_text`` (vocabulary < VOCAB_SIZE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers import decoders as tk_decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 8,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
        )
    )


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(
        MistralConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            sliding_window=None,
        )
    )


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
        )
    )


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=256))


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    )


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=256,
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    )


TINY_MODELS = {
    "llama": _llama,
    "mistral-gqa": _mistral,
    "qwen2": _qwen2,
    "opt": _opt,
    "gpt2": _gpt2,
    "gpt-neox": _gpt_neox,
    "gemma3-sliding": _gemma3,
}


def build_tiny_model(name: str, seed: int = 0):
    """A freshly initialised tiny model of family ``name`` (fp32, eval mode, seeded)."""
    torch.manual_seed(seed)
    model = TINY_MODELS[name]()
    return model.eval()


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model_name(request) -> str:
    return request.param


def interrupt_at_block(monkeypatch, block: int) -> None:
    """Make the driver (every mode runs the one loop) raise KeyboardInterrupt when it reaches ``block``."""
    from optimum_admm import sequential

    real = sequential._prune_block

    def failing(run, index, inputs):
        if index == block:
            raise KeyboardInterrupt
        return real(run, index, inputs)

    monkeypatch.setattr(sequential, "_prune_block", failing)


def assert_pruned_alike(reference, model, weights_of, ids) -> None:
    """The same block weights (read with ``weights_of``) and bitwise-identical logits on ``ids[:, :40]``."""
    expected, got = weights_of(reference), weights_of(model)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids[:, :40]).logits, reference(input_ids=ids[:, :40]).logits)


#: The offline switches a user's shell may set; tests that talk to the loopback Hub server drop them.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def online_environment() -> dict[str, str]:
    """``os.environ`` without the offline switches, for a subprocess that talks to the loopback Hub server."""
    return {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}


def tree_hash(directory) -> str:
    """A digest of every file's relative path and bytes under ``directory`` (the source is unchanged if equal)."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def free_loopback_port() -> int:
    """A free TCP port on 127.0.0.1 (for a torchrun rendezvous or a test server)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(nproc: int, script, *args: str) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` processes, rendezvous on 127.0.0.1 only."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_loopback_port()), str(script), *args]  # fmt: skip


#: What every torchrun test launch adds to the environment: gloo over loopback, one thread per rank.
GLOO_ENVIRONMENT = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
