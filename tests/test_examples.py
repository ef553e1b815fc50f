"""Every script in examples/ runs end to end on a tiny model (a real subprocess, offline, seconds each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_model, build_tokenizer, make_text

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
SKIPPED: dict[str, str] = {}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny LLaMA checkpoint with its tokenizer, a text file and a folder of two text 'domains'."""
    root = tmp_path_factory.mktemp("example-assets")
    text = make_text(3000)
    model = build_tiny_model("llama")
    model.save_pretrained(root / "tiny-llama")
    build_tokenizer(text).save_pretrained(root / "tiny-llama")
    (root / "text.txt").write_text(text)
    (root / "domains").mkdir()
    (root / "domains" / "prose.txt").write_text(make_text(1500, seed=1))
    (root / "domains" / "more_prose.txt").write_text(make_text(1500, seed=2))
    return root


def arguments(name: str, assets: Path, out: Path) -> list[str]:
    model, text = str(assets / "tiny-llama"), str(assets / "text.txt")
    return {
        "prune_model.py": [
            "--model", model, "--calibration", text, "--eval", text, "--num-samples", "4", "--sequence-length", "32",
            "--eval-tokens", "256", "--eval-length", "64", "--save-dir", str(out / "pruned"),
            "--report-json", str(out / "report.json"),
        ],
        "shear_model.py": [
            "--model", model, "--text-file", text, "--steps", "2", "--sequence-length", "32", "--batch-size", "2",
            "--target", json.dumps({"num_hidden_layers": 1, "intermediate_size": 32}),
            "--output-dir", str(out / "sheared"),
        ],
        "finetune_sparse.py": [
            "--model", model, "--text-file", text, "--sparsity", "0.5", "--num-samples", "4",
            "--calibration-length", "32", "--steps", "2", "--batch-size", "2", "--sequence-length", "32",
            "--eval-tokens", "256", "--eval-length", "64", "--output-dir", str(out / "ft"),
            "--report-json", str(out / "ft.json"),
        ],
        "dynamic_batch_loading.py": [
            "--source", model, "--text-dir", str(assets / "domains"), "--max-steps", "2", "--eval-steps", "1",
            "--sequence-length", "32", "--batch-size", "2", "--num-workers", "0", "--output-dir", str(out / "dbl"),
        ],
    }[name]  # fmt: skip


def check_outputs(name: str, out: Path) -> None:
    if name == "prune_model.py":
        report = json.loads((out / "report.json").read_text())
        assert abs(report["sparsity"] - 0.5) < 1e-3
        assert (out / "pruned" / "pruning_config.json").is_file()
    elif name == "shear_model.py":
        config = json.loads((out / "sheared" / "config.json").read_text())
        assert config["num_hidden_layers"] == 1 and config["intermediate_size"] == 32
    elif name == "dynamic_batch_loading.py":
        assert any((out / "dbl").glob("checkpoint-*"))
    elif name == "finetune_sparse.py":
        report = json.loads((out / "ft.json").read_text())
        assert report["sparsity_check"]["pruned_entries_nonzero_after_training"] == 0


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_on_a_tiny_model(name, assets, tmp_path):
    if name in SKIPPED:
        pytest.skip(f"examples/{name}: {SKIPPED[name]}")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "2",
        "WANDB_DISABLED": "true",
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *arguments(name, assets, tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"examples/{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    check_outputs(name, tmp_path)
