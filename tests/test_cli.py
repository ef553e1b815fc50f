"""The optimum-cli plugin and the optimum-admm console script, run as real subprocesses."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, online_environment
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
    assert "prune" in out and "evaluate" in out and "shear" in out


def test_prune_writes_a_loadable_model_and_pushes_it(dense_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    with HubServer({TOKEN}) as hub:
        env = {
            **online_environment(),  # the loopback Hub is reachable whatever offline mode the user's shell sets
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
        (["--method", "wanda", "--preset", "fast"], "--preset fast is for --method admm; --method is 'wanda'"),
        (["--preset", "fastest"], "argument --preset: invalid choice: 'fastest'"),
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


def test_preset_sets_the_iterations_and_flags_override_the_rest():
    import argparse

    from optimum_admm import ADMMConfig
    from optimum_admm.commands import PruneCommand

    parser = argparse.ArgumentParser()
    PruneCommand.parse_args(parser)
    command = PruneCommand.__new__(PruneCommand)
    command.args = parser.parse_args(["--model", "m", "--output", "o", "--preset", "fast", "--pattern", "2:4"])
    assert command._config() == ADMMConfig.from_preset("fast", mask_structure="2:4")
    assert (command._config().iterations, command._config().mask_iterations) == (4, 3)
    command.args = parser.parse_args(["--model", "m", "--output", "o", "--preset", "balanced", "--seed", "3"])
    assert command._config() == ADMMConfig(iterations=10, mask_iterations=8, seed=3)


HALF = {
    "num_hidden_layers": 1,
    "hidden_size": 16,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 32,
}  # half of the tiny llama's 2 layers, hidden 32, 4 heads / 4 KV heads, FFN 64
SHEAR_FAST = ["--steps", "3", "--sequence-length", "32", "--max-sequences", "16", "--batch-size", "4", "--no-progress"]


def _assert_sheared(out: Path, stdout: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert {name: getattr(model.config, name) for name in HALF} == HALF
    assert len(model.model.layers) == 1 and model.model.layers[0].mlp.up_proj.weight.shape == (32, 16)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(**tokenizer("the whale and the sea", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    assert (out / "shearing_config.json").is_file() and (out / "shearing_state.safetensors").is_file()
    assert "num_hidden_layers 2 -> 1" in stdout and "intermediate_size 64 -> 32" in stdout
    assert "parameters: " in stdout and f"saved to {out.resolve()}" in stdout
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0o700


def test_shear_inline_target_in_a_real_process(dense_dir, tmp_path):
    out = tmp_path / "sheared"
    inline = ",".join(f"{key}={value}" for key, value in HALF.items())
    result = _run(
        "admm", "shear",
        "--model", str(dense_dir / "dense"),
        "--target-config", inline,
        "--dataset", str(dense_dir / "calib.txt"),
        "--output", str(out),
        *SHEAR_FAST,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _assert_sheared(out, result.stdout)


def test_shear_evaluates_writes_card_and_sidecar_and_pushes_to_the_hub(dense_dir, tmp_path):
    """The sheared output is Hub-native: card, sidecar, config section, no training-only flags, one push."""
    from huggingface_hub import ModelCard

    from optimum_admm import inspect
    from optimum_admm.export import load_pruning_config
    from optimum_admm.structured import ShearingConfig

    out = tmp_path / "sheared"
    inline = ",".join(f"{key}={value}" for key, value in HALF.items())
    with HubServer({TOKEN}) as hub:
        env = {**online_environment(), "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
        result = _run(
            "admm", "shear",
            "--model", str(dense_dir / "dense"),
            "--target-config", inline,
            "--dataset", str(dense_dir / "calib.txt"),
            "--eval-dataset", str(dense_dir / "calib.txt"),
            "--eval-max-tokens", "128",
            "--output", str(out),
            "--push-to-hub", "org/sheared",
            *SHEAR_FAST,
            env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert TOKEN not in result.stdout + result.stderr
        assert "pushed to org/sheared" in result.stdout and "perplexity on calib.txt" in result.stdout
        pushed = hub.state.files("org/sheared")
        assert hub.state.commits("org/sheared")[-1].message.startswith("Upload sheared model (")
    _assert_sheared(out, result.stdout)
    assert pushed["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert {"README.md", "pruning_config.json", "shearing_config.json", "shearing_state.safetensors"} <= set(pushed)
    config = json.loads((out / "config.json").read_text())
    assert config.get("use_cache", True) is True  # the Trainer's use_cache=False is not persisted
    assert config["pruning"]["method"] == "sheared_llama"
    meta = json.loads((out / "pruning_config.json").read_text())
    assert meta["method"] == "sheared_llama" and meta["target_shape"]["num_hidden_layers"] == 1
    assert meta["source_shape"]["num_hidden_layers"] == 2
    assert meta["training"] == {"steps": 3, "tokens_seen": 3 * 4 * 32}
    assert meta["parameters"]["sheared"] < meta["parameters"]["source"]
    assert meta["gates"]["trajectory"] and meta["evaluation"]["calib.txt"]["perplexity"] > 1
    assert meta["gates"]["far_from_target"]  # 3 steps cannot reach the target: recorded, and warned about
    assert "far from the target" in result.stderr
    card = ModelCard.load(out / "README.md")
    assert "sheared-llama" in card.data.tags and card.data.eval_results
    assert 'from_pretrained("org/sheared")' in card.text and "2 → 1" in card.text
    assert isinstance(load_pruning_config(out), ShearingConfig)
    assert ShearingConfig.from_pretrained(out).num_hidden_layers == 1
    report = inspect(out)
    assert report.pruned and report.method == "sheared_llama" and "structured" in str(report)


@pytest.mark.parametrize("kind", ["model-config", "shearing-config"])
def test_shear_json_target_with_the_console_script(kind, dense_dir, tmp_path, capsys):
    from transformers import AutoConfig

    from optimum_admm.commands import main
    from optimum_admm.structured import ShearingConfig

    target = tmp_path / "target.json"
    if kind == "model-config":  # a transformers config.json of the target shape: only the shape fields are used
        config = AutoConfig.from_pretrained(dense_dir / "dense")
        for key, value in HALF.items():
            setattr(config, key, value)
        config.to_json_file(target)
    else:
        target.write_text(ShearingConfig(**HALF, lagrangian_warmup=0.5).to_json())
    out = tmp_path / "sheared"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    main(
        [
            "shear",
            "--model", str(dense_dir / "dense"),
            "--target-config", str(target),
            "--dataset", str(dense_dir / "calib.txt"),
            "--output", str(out),
            "--overwrite",
            *SHEAR_FAST,
        ]
    )  # fmt: skip
    _assert_sheared(out, capsys.readouterr().out)
    assert not (out / "stale.txt").exists()
    if kind == "shearing-config":
        assert (
            ShearingConfig.from_dict(json.loads((out / "shearing_config.json").read_text())).lagrangian_warmup == 0.5
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--target-config", "num_layers=1"],
            "unknown key 'num_layers'; allowed keys: num_hidden_layers, hidden_size",
        ),
        (["--target-config", "num_hidden_layers=two"], "num_hidden_layers='two' is not an integer"),
        (["--target-config", "num_hidden_layers"], "argument --target-config: 'num_hidden_layers' is neither"),
        (["--target-config", "num_hidden_layers=1,num_hidden_layers=1"], "'num_hidden_layers' is given twice"),
        (["--target-config", "lagrangian_warmup=2"], "lagrangian_warmup=2.0 is out of range"),
        (["--target-config", "num_hidden_layers=4"], "target num_hidden_layers=4 exceeds the source model's 2"),
        (["--target-config", "num_hidden_layers=2"], "nothing to prune"),
        (["--target-config", "{json}"], "ShearingConfig has no field 'layers'; allowed: num_hidden_layers"),
        (["--dataset", "no-such-file.txt"], "argument --dataset: 'no-such-file.txt' is neither"),
        (["--steps", "0"], "argument --steps: '0' is invalid"),
        (["--learning-rate", "-1"], "argument --learning-rate: '-1' is invalid"),
        (["--sequence-length", "1024"], "1024 exceeds the model's max_position_embeddings=256"),
        (["--model", "no-such-model-dir"], "argument --model: cannot load the config of 'no-such-model-dir'"),
        (["--output", "full"], "save_dir='full' is a non-empty directory"),
    ],
)
def test_shear_bad_arguments_exit_2_before_loading_the_model(args, message, dense_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    def no_loading(cls, *args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(no_loading))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("not mine")
    (tmp_path / "bad.json").write_text(json.dumps({"layers": 1}))
    args = [str(tmp_path / "bad.json") if arg == "{json}" else arg for arg in args]
    defaults = {
        "--model": str(dense_dir / "dense"),
        "--target-config": "num_hidden_layers=1",
        "--dataset": str(dense_dir / "calib.txt"),
        "--steps": "3",
        "--sequence-length": "32",
        "--output": "o",
    }
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    with pytest.raises(SystemExit) as exit_info:
        _optimum_cli_in_process(monkeypatch, "admm", "shear", *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and (tmp_path / "full" / "keep.txt").exists()


def test_inline_target_config_takes_every_shearing_config_field():
    from optimum_admm.commands.shear import _shearing_config
    from optimum_admm.structured import ShearingConfig

    config = _shearing_config(
        "num_hidden_layers=1, intermediate_size=32,structures=layer+intermediate,head_gating=query,"
        "strict_head_dim=false,temperature=0.5"
    )
    assert config == ShearingConfig(
        num_hidden_layers=1,
        intermediate_size=32,
        structures=["layer", "intermediate"],
        head_gating="query",
        strict_head_dim=False,
        temperature=0.5,
    )


# -- large models: --streaming, --checkpoint-dir, --activation-cache-dir, --activation-memory --------------------------------


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tokenizer, corpus_text):
    """A tiny dense checkpoint in several safetensors shards with its tokenizer, and a calibration text file."""
    root = tmp_path_factory.mktemp("cli-sharded")
    build_tiny_model("llama").save_pretrained(root / "dense", max_shard_size="20KB")
    tokenizer.save_pretrained(root / "dense")
    (root / "calib.txt").write_text(corpus_text)
    return root


def _prune_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prune",
        "--model", str(root / "dense"),
        "--sparsity", "0.5",
        "--dataset", str(root / "calib.txt"),
        "--num-samples", "4",
        "--sequence-length", "32",
        "--output", str(out),
        "--no-progress",
        *extra,
    ]  # fmt: skip


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _assert_same_weights(path: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = _weights(path)
    assert weights.keys() == reference.keys()
    different = [name for name, tensor in weights.items() if not torch.equal(tensor, reference[name])]
    assert not different, different


@pytest.fixture(scope="module")
def in_memory_weights(sharded_dir, tmp_path_factory):
    """The weights `admm prune` saves without any large-model flag: what every other mode must reproduce."""
    from optimum_admm.commands import main

    out = tmp_path_factory.mktemp("cli-reference") / "out"
    main(_prune_args(sharded_dir, out))
    weights = _weights(out)
    assert int((weights["model.layers.0.mlp.up_proj.weight"] == 0).sum()) == 64 * 32 // 2
    return weights


def test_streaming_saves_the_in_memory_weights(sharded_dir, in_memory_weights, tmp_path, capsys):
    from optimum_admm.commands import main

    out = tmp_path / "streamed"
    calib = str(sharded_dir / "calib.txt")
    main(_prune_args(sharded_dir, out, "--streaming", "--execution-device", "cpu", "--eval-dataset", calib))
    stdout = capsys.readouterr().out
    assert "streamed: load " in stdout and " compute " in stdout and " write " in stdout
    assert "perplexity on calib.txt: " in stdout
    assert f"saved to {out.resolve()}" in stdout
    _assert_same_weights(out, in_memory_weights)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 3 and (out / "model.safetensors.index.json").is_file()  # the rest + one per block
    meta = json.loads((out / "pruning_config.json").read_text())
    assert meta["config"]["sparsity"] == 0.5 and meta["calibration"]["dataset"] == "file:calib.txt"
    assert meta["calibration"]["num_samples"] == 4 and len(meta["layers"]) == 14
    assert meta["evaluation"]["calib.txt"]["perplexity"] > 1
    card = (out / "README.md").read_text()
    assert "optimum-cli admm prune --model" in card and "calib.txt" in card
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_checkpoint_dir_records_blocks_and_a_rerun_is_identical(
    streaming, sharded_dir, in_memory_weights, tmp_path, capsys
):
    from optimum_admm.commands import main

    checkpoint, out = tmp_path / "ckpt", tmp_path / "out"
    args = _prune_args(sharded_dir, out, "--checkpoint-dir", str(checkpoint), *(["--streaming"] * streaming))
    main(args)
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["next_block"] == 2
    _assert_same_weights(out, in_memory_weights)
    main([*args, "--overwrite"])  # the same command again: every block comes from the checkpoint
    _assert_same_weights(out, in_memory_weights)
    shutil.rmtree(out)
    main(args)
    _assert_same_weights(out, in_memory_weights)
    assert f"saved to {out.resolve()}" in capsys.readouterr().out


_KILL_AFTER_FIRST_BLOCK = """
import os, signal, sys
import optimum_admm.resume as resume
from optimum_admm.commands import main

real = resume.save_block
def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
resume.save_block = save_then_die
main(sys.argv[1:])
"""


def test_streaming_command_killed_then_rerun_continues_and_matches(sharded_dir, in_memory_weights, tmp_path):
    from optimum_admm.commands import main

    source = sharded_dir / "dense"
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    checkpoint, out = tmp_path / "ckpt", tmp_path / "out"
    args = _prune_args(sharded_dir, out, "--streaming", "--checkpoint-dir", str(checkpoint))
    script = tmp_path / "killed.py"
    script.write_text(_KILL_AFTER_FIRST_BLOCK)
    killed = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((checkpoint / "state.json").read_text())["next_block"] == 1
    assert not out.exists()  # nothing that looks like a finished output
    assert list(tmp_path.glob(".out.tmp-*"))  # the killed run's staging directory (a SIGKILL runs no cleanup)
    main(args)  # the same command again
    _assert_same_weights(out, in_memory_weights)
    assert not list(tmp_path.glob(".out.*"))  # the rerun removed it
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_activation_cache_dir_is_used_and_left_empty(streaming, sharded_dir, in_memory_weights, tmp_path):
    from optimum_admm.commands import main

    cache, out = tmp_path / "activations", tmp_path / "out"
    main(_prune_args(sharded_dir, out, "--activation-cache-dir", str(cache), *(["--streaming"] * streaming)))
    assert cache.is_dir() and not list(cache.iterdir())
    _assert_same_weights(out, in_memory_weights)


def test_activation_memory_budget_too_small_is_refused_with_the_numbers(sharded_dir, tmp_path, capsys):
    from optimum_admm.commands import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(_prune_args(sharded_dir, out, "--activation-memory", "1KiB"))
    assert exit_info.value.code == 2  # a budget that cannot hold the data is a bad --activation-memory
    err = capsys.readouterr().err
    assert "activation_memory='1KiB'" in err and "Traceback" not in err
    assert not out.exists()
    main(_prune_args(sharded_dir, out, "--activation-memory", "100000000", "--streaming"))
    assert (out / "model.safetensors.index.json").is_file()
    with pytest.raises(SystemExit) as exit_info:  # the former flag name still works, with a warning
        main(_prune_args(sharded_dir, tmp_path / "again", "--max-memory", "1KiB"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--max-memory is renamed --activation-memory" in err


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_streaming_from_the_hub_downloads_safetensors_only_and_pushes(
    sharded_dir, in_memory_weights, tmp_path, monkeypatch
):
    from huggingface_hub import HfApi, constants

    from optimum_admm.commands import main

    with HubServer({TOKEN}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        # transformers caches one HfApi (and its endpoint) on first use: a fresh one for this server
        monkeypatch.setattr(importlib.import_module("transformers.utils.hub"), "_hf_api", None)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        upload = tmp_path / "upload"
        shutil.copytree(sharded_dir / "dense", upload)
        (upload / "pytorch_model.bin").write_bytes(b"never downloaded")
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo("org/dense")
        api.upload_folder(repo_id="org/dense", folder_path=upload)
        out = tmp_path / "out"
        model_args = ["--model", "org/dense"]
        args = _prune_args(sharded_dir, out, "--streaming", "--push-to-hub", "org/pruned")
        args[args.index("--model") : args.index("--model") + 2] = model_args
        main(args)
        pushed = hub.state.files("org/pruned")
    downloaded = {p.name for p in (tmp_path / "hf-cache").rglob("*") if p.is_file() or p.is_symlink()}
    assert "pytorch_model.bin" not in downloaded and "config.json" in downloaded
    _assert_same_weights(out, in_memory_weights)
    assert "base_model: org/dense" in (out / "README.md").read_text()
    assert pushed["README.md"] == (out / "README.md").read_bytes() and "pruning_config.json" in pushed
    assert pushed["model-00002-of-00003.safetensors"] == (out / "model-00002-of-00003.safetensors").read_bytes()
    assert b'from_pretrained("org/pruned")' in pushed["README.md"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--activation-memory", "abc"], "argument --activation-memory: activation_memory='abc' is invalid"),
        (["--activation-memory", "0"], "argument --activation-memory: activation_memory='0' is invalid"),
        (["--activation-cache-dir", "a-file"], "argument --activation-cache-dir: activation_cache_dir='a-file'"),
        (
            ["--activation-memory", "8GiB", "--activation-cache-dir", "cache"],
            "not allowed with --activation-cache-dir",
        ),
        (["--checkpoint-dir", "a-file"], "argument --checkpoint-dir: 'a-file' exists and is not a directory"),
        (["--checkpoint-dir", "o/ckpt"], "argument --checkpoint-dir: must not be --output or inside it"),
        (["--execution-device", "cuda:0"], "argument --execution-device: applies only with --streaming"),
        (["--streaming", "--device-map", "auto"], "argument --streaming: not allowed with --device-map"),
        (
            ["--streaming", "--save-masks", "--torch-dtype", "float16"],
            "argument --streaming: not allowed with --torch-dtype, --save-masks",
        ),
        (["--streaming", "--max-shard-size", "1GB"], "not allowed with --max-shard-size"),
        (["--streaming", "--trust-remote-code"], "not allowed with --trust-remote-code"),
        (["--streaming", "--execution-device", "no-such-device"], "argument --execution-device: 'no-such-device'"),
        (["--streaming", "--model", "a-file"], "argument --model: 'a-file' is not a directory"),
        (["--streaming", "--model", "bin-only"], "streaming mode reads safetensors only"),
        (["--streaming", "--model", "./not/there"], "argument --model: neither a local directory nor a Hub id"),
    ],
)
def test_large_model_bad_arguments_exit_2_before_loading(args, message, dense_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    def no_loading(cls, *args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(no_loading))
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", classmethod(no_loading))
    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(no_loading))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "bin-only").mkdir()
    (tmp_path / "bin-only" / "pytorch_model.bin").write_bytes(b"pickle")
    if "--model" not in args:
        args = ["--model", str(dense_dir / "dense"), *args]
    with pytest.raises(SystemExit) as exit_info:
        _optimum_cli_in_process(monkeypatch, "admm", "prune", "--output", "o", *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_cli_reproduces_a_python_device_map_run_with_json_and_an_offload_folder(dense_dir, tmp_path):
    from safetensors.torch import load_file
    from test_offload import _device_map

    from optimum_admm import ADMMConfig, ADMMPruner
    from optimum_admm.commands import main

    mapping = _device_map(build_tiny_model("llama"), offloaded={1})
    assert "disk" in mapping.values()
    config = ADMMConfig(num_samples=4, sequence_length=32)
    pruner = ADMMPruner.from_pretrained(str(dense_dir / "dense"), config=config, device_map=mapping,
                                        offload_folder=str(tmp_path / "offload-python"))  # fmt: skip
    assert next(pruner.model.model.layers[1].parameters()).is_meta  # really offloaded
    pruner.prune(str(dense_dir / "calib.txt"), save_dir=tmp_path / "python", show_progress=False)
    main(["prune", "--model", str(dense_dir / "dense"), "--dataset", str(dense_dir / "calib.txt"), "--num-samples",
          "4", "--sequence-length", "32", "--no-progress", "--output", str(tmp_path / "cli"), "--device-map",
          json.dumps(mapping), "--offload-folder", str(tmp_path / "offload-cli")])  # fmt: skip
    python, cli = (
        load_file(str(tmp_path / "python" / "model.safetensors")),
        load_file(str(tmp_path / "cli" / "model.safetensors")),
    )
    assert python.keys() == cli.keys() and all(torch.equal(python[k], cli[k]) for k in python)
    assert (
        int((cli["model.layers.1.mlp.up_proj.weight"] == 0).sum())
        == cli["model.layers.1.mlp.up_proj.weight"].numel() // 2
    )


def test_cli_refuses_a_device_map_that_is_not_json(dense_dir, tmp_path, capsys):
    from optimum_admm.commands import main

    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--model", str(dense_dir / "dense"), "--output", str(tmp_path / "o"), "--device-map", "{oops"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--device-map: '{oops' is not valid JSON" in err and "Traceback" not in err


def test_prune_calibrates_on_any_dataset_datasets_loads(dense_dir, tmp_path, corpus_text, capsys):
    from optimum_admm.commands import main

    data = tmp_path / "my-dataset"
    data.mkdir()
    paragraphs = [p for p in corpus_text.split("\n\n") if p.strip()]
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"body": p, "n": i}) + "\n" for i, p in enumerate(paragraphs))
    )
    common = ["prune", "--model", str(dense_dir / "dense"), "--num-samples", "4", "--sequence-length", "32",
              "--no-progress", "--dataset", str(data), "--dataset-split", "train"]  # fmt: skip
    main([*common, "--text-column", "body", "--output", str(tmp_path / "out")])
    sidecar = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert sidecar["calibration"]["dataset"] == "datasets:my-dataset[train].body"
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--text-column", "n", "--output", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "text_column='n' holds a int at row 0" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main([*common[:-4], "--dataset", "missing-calib.txt", "--output", str(tmp_path / "out3")])
    assert exit_info.value.code == 2 and "'missing-calib.txt' does not exist" in capsys.readouterr().err


def test_evaluate_reports_against_a_dense_baseline_and_runs_lm_eval_tasks(dense_dir, tmp_path, monkeypatch, capsys):
    import types

    from optimum_admm.commands import main

    main(["prune", "--model", str(dense_dir / "dense"), "--dataset", str(dense_dir / "calib.txt"), "--num-samples",
          "4", "--sequence-length", "32", "--no-progress", "--output", str(tmp_path / "pruned")])  # fmt: skip
    capsys.readouterr()
    seen = []

    class FakeHFLM:  # lm-eval is optional: its two entry points the bridge calls, recorded
        def __init__(self, **kwargs):
            seen.append(kwargs["pretrained"])

    fake = {name: types.ModuleType(name) for name in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface",
                                                      "lm_eval.tasks")}  # fmt: skip
    fake["lm_eval"].simple_evaluate = lambda **kwargs: {"results": {t: {"acc": 0.25} for t in kwargs["tasks"]}}
    fake["lm_eval.models.huggingface"].HFLM = FakeHFLM
    fake["lm_eval.tasks"].TaskManager = lambda **kwargs: None
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    main(["evaluate", "--model", str(tmp_path / "pruned"), "--dataset", str(dense_dir / "calib.txt"),
          "--sequence-length", "32", "--max-tokens", "256", "--baseline", str(dense_dir / "dense"), "--tasks",
          "arc_easy,piqa", "--json"])  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["baseline"]["model"] == str(dense_dir / "dense")
    assert result["perplexity"] > result["baseline"]["perplexity"] > 1  # the pruned model is worse than the dense
    assert result["tasks"] == result["baseline"]["tasks"] == {"arc_easy": {"acc": 0.25}, "piqa": {"acc": 0.25}}
    assert len(seen) == 2  # both models went through lm-eval
    main(["evaluate", "--model", str(tmp_path / "pruned"), "--dataset", str(dense_dir / "calib.txt"),
          "--sequence-length", "32", "--max-tokens", "256", "--baseline", str(dense_dir / "dense")])  # fmt: skip
    out = capsys.readouterr().out
    assert "baseline perplexity on calib.txt" in out and "perplexity change against the baseline: +" in out
