"""The optimum-cli plugin and the optimum-admm console script, run as real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from hub_server import HubServer

TOKEN = "hf_cli_Secret_81d3aa0f"
OPTIMUM_CLI = shutil.which("optimum-cli") or str(Path(sys.executable).with_name("optimum-cli"))


def _run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [OPTIMUM_CLI, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer, corpus_text):
    """A tiny dense checkpoint with its tokenizer, and a calibration text file beside it."""
    root = tmp_path_factory.mktemp("cli")
    build_tiny_model("llama").save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    (root / "calib.txt").write_text(corpus_text)
    return root


def test_optimum_cli_lists_admm():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert "admm" in result.stdout


def _optimum_cli_in_process(monkeypatch, *args: str) -> None:
    """optimum-cli's own main() (the same parser and plugin discovery as the executable), in this process."""
    from optimum.commands.optimum_cli import main

    monkeypatch.setattr(sys, "argv", ["optimum-cli", *args])
    main()


def test_admm_group_lists_its_subcommands(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _optimum_cli_in_process(monkeypatch, "admm", "--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "prune" in out and "evaluate" in out


def test_prune_writes_a_loadable_model_and_pushes_it(dense_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    with HubServer({TOKEN}) as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": TOKEN,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        result = _run(
            "admm", "prune",
            "--model", str(dense_dir / "dense"),
            "--method", "admm",
            "--sparsity", "0.5",
            "--pattern", "2:4",
            "--dataset", str(dense_dir / "calib.txt"),
            "--num-samples", "4",
            "--sequence-length", "32",
            "--output", str(out),
            "--save-masks",
            "--push-to-hub", "org/cli-model",
            "--no-progress",
            env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert TOKEN not in result.stdout + result.stderr
        assert "pushed to org/cli-model" in result.stdout
        pushed = hub.state.files("org/cli-model")
    assert pushed["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert {"masks.safetensors", "pruning_config.json", "README.md"} <= set(pushed)
    assert b'from_pretrained("org/cli-model")' in pushed["README.md"]
    for path in out.rglob("*"):
        assert TOKEN.encode() not in path.read_bytes(), path

    model = AutoModelForCausalLM.from_pretrained(out)
    up = model.model.layers[0].mlp.up_proj.weight
    assert int((up == 0).sum()) == up.numel() // 2
    assert not torch.equal(up, build_tiny_model("llama").model.layers[0].mlp.up_proj.weight)
    meta = json.loads((out / "pruning_config.json").read_text())
    assert meta["config"]["mask_structure"] == "2:4" and meta["calibration"]["dataset"] == "file:calib.txt"
    assert "optimum-cli admm prune --model" in (out / "README.md").read_text()


def test_bad_argument_is_an_argparse_error_in_a_real_process(tmp_path):
    result = _run("admm", "prune", "--model", "m", "--output", str(tmp_path / "o"), "--sparsity", "1.5")
    assert result.returncode == 2
    assert "argument --sparsity: '1.5' is out of range" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "no-such-method"], "argument --method: invalid choice: 'no-such-method'"),
        (["--pattern", "4:2"], "argument --pattern"),
        (["--num-samples", "0"], "argument --num-samples"),
        (["--dataset", "no-such-file.txt"], "argument --dataset"),
        (["--recipe", "no-such-recipe.json"], "argument --recipe"),
        (["--sparsity", "0.3", "--pattern", "2:4"], "sparsity=0.3 contradicts"),
        (["--max-shard-size", "huge"], "max_shard_size='huge'"),
        (["--push-to-hub", "not a repo"], "repo_id='not a repo'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(args, message, dense_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = str(dense_dir / "dense")
    with pytest.raises(SystemExit) as exit_info:
        _optimum_cli_in_process(monkeypatch, "admm", "prune", "--model", model, "--output", "o", *args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_console_script_evaluate(dense_dir, capsys):
    from optimum_admm.commands import main

    main(
        [
            "evaluate",
            "--model", str(dense_dir / "dense"),
            "--dataset", str(dense_dir / "calib.txt"),
            "--sequence-length", "32",
            "--max-tokens", "200",
            "--json",
        ]
    )  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dataset"] == "calib.txt" and result["perplexity"] > 1 and result["sequence_length"] == 32


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    from optimum_admm.commands import main

    (script,) = entry_points(group="console_scripts", name="optimum-admm")
    assert script.load() is main


def test_recipe_rebuilds_the_saved_config_and_flags_override_it(tmp_path):
    import argparse

    from optimum_admm import ADMMConfig
    from optimum_admm.commands import PruneCommand
    from optimum_admm.export import pruning_metadata

    saved = ADMMConfig(sparsity=0.7, rho=2.5, iterations=12, mask_iterations=6, seed=5)
    recipe = tmp_path / "pruning_config.json"
    recipe.write_text(json.dumps(pruning_metadata(saved, None)))
    parser = argparse.ArgumentParser()
    PruneCommand.parse_args(parser)
    command = PruneCommand.__new__(PruneCommand)  # only the config building, no parser registration
    command.args = parser.parse_args(["--model", "m", "--output", "o", "--recipe", str(recipe)])
    assert command._config() == saved
    command.args = parser.parse_args(["--model", "m", "--output", "o", "--recipe", str(recipe), "--pattern", "2:4"])
    assert command._config() == ADMMConfig(mask_structure="2:4", rho=2.5, iterations=12, mask_iterations=6, seed=5)
