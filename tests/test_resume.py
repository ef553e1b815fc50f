"""Resume: an interrupted prune (exception or SIGKILL) continues from the next block and ends bitwise identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, interrupt_at_block
from conftest import tree_hash as _tree_hash

from optimum_admm import ADMMConfig, ADMMPruner

FAST = {"num_samples": 4, "sequence_length": 32, "seed": 1}
TESTS = Path(__file__).parent


def _prune(model, tokenizer, text, checkpoint_dir=None, **config):
    pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=ADMMConfig(**{**FAST, **config}))
    return pruner.prune(calibration_dataset=[text], show_progress=False, checkpoint_dir=checkpoint_dir)


@pytest.mark.parametrize("family", ["gemma3-sliding"])  # 3 blocks, per-layer masks: resumes mid-model
def test_exception_then_resume_is_identical(family, tokenizer, corpus_text, tmp_path, monkeypatch):
    reference = build_tiny_model(family)
    expected_report = _prune(reference, tokenizer, corpus_text)
    checkpoint = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        interrupt_at_block(patch, block=1)
        with pytest.raises(KeyboardInterrupt):
            _prune(build_tiny_model(family), tokenizer, corpus_text, checkpoint)
    assert (checkpoint / "block-00000.safetensors").exists() and not (checkpoint / "block-00001.safetensors").exists()

    resumed = build_tiny_model(family)  # the same command again: a fresh dense model
    report = _prune(resumed, tokenizer, corpus_text, checkpoint)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert [r.name for r in report.layers] == [r.name for r in expected_report.layers]
    assert [r.relative_error for r in report.layers] == [r.relative_error for r in expected_report.layers]


def test_changed_config_or_data_refuses_to_resume(tokenizer, corpus_text, tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        interrupt_at_block(patch, block=1)
        with pytest.raises(KeyboardInterrupt):
            _prune(build_tiny_model("llama"), tokenizer, corpus_text, checkpoint)
    with pytest.raises(ValueError, match=r"config\.sparsity: 0\.5 -> 0\.6"):
        _prune(build_tiny_model("llama"), tokenizer, corpus_text, checkpoint, sparsity=0.6)
    with pytest.raises(ValueError, match=r"model: '[0-9a-f]+' -> '[0-9a-f]+'"):
        _prune(build_tiny_model("llama", seed=1), tokenizer, corpus_text, checkpoint)
    with pytest.raises(ValueError, match=r"calibration: "):
        _prune(build_tiny_model("llama"), tokenizer, corpus_text[500:], checkpoint)


_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import build_tokenizer, make_text
import optimum_admm.resume as resume
from optimum_admm import ADMMConfig, ADMMPruner

source, checkpoint, output, kill = sys.argv[1:5]
if kill == "1":
    real = resume.save_block
    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    resume.save_block = save_then_die
text = make_text()
pruner = ADMMPruner.from_pretrained(source, config=ADMMConfig(num_samples=4, sequence_length=32, seed=1))
pruner.prune(calibration_dataset=[text], show_progress=False, checkpoint_dir=checkpoint or None)
pruner.model.save_pretrained(output)
"""


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=300)


def test_sigkill_then_resume_is_identical_and_source_untouched(tokenizer, tmp_path):
    source = tmp_path / "source"
    build_tiny_model("llama").save_pretrained(source)
    tokenizer.save_pretrained(source)
    before = _tree_hash(source)
    script = tmp_path / "prune.py"
    script.write_text(_SCRIPT.format(tests=str(TESTS)))

    killed = _run(script, str(source), str(tmp_path / "ckpt"), str(tmp_path / "unused"), "1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "ckpt" / "state.json").exists()
    resumed = _run(script, str(source), str(tmp_path / "ckpt"), str(tmp_path / "resumed"), "0")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the uninterrupted run in a process of its own too: the same thread count (LAPACK's inverse is bitwise the same
    # only at one thread count, and an earlier test may have changed this process's)
    straight = _run(script, str(source), "", str(tmp_path / "straight"), "0")
    assert straight.returncode == 0, straight.stderr[-2000:]

    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    expected = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert got and all(torch.equal(got[k], expected[k]) for k in got)
    assert _tree_hash(source) == before
