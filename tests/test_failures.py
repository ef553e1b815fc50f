"""Bad inputs and faults, table-driven: each one is a clear error, at the right stage, leaving nothing behind.

Every case asserts the exception type (API) or exit status (CLI), that the message names the parameter, flag or file
and the bad value, that the CLI prints no traceback, the stage it stopped at (spies on model loading and on the
first forward) and that nothing was written: no output or staging directory, the source unchanged. The CLI cases
run the console script's ``main()`` in this process (so the spies see inside); a few run it as real subprocesses
(no traceback, ``--debug``, offline datasets, SIGINT with resume).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny_model
from conftest import tree_hash as _tree_hash

import optimum_admm.sequential as sequential
from optimum_admm import ADMMConfig, ADMMPruner, MagnitudeConfig, PruningConfig, SparseGPTConfig, WandaConfig, errors

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer, corpus_text) -> Path:
    """A dense checkpoint and the broken sources and files the cases point at."""
    root = tmp_path_factory.mktemp("failures")
    dense = root / "dense"
    build_tiny_model("llama").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    (root / "calib.txt").write_text(corpus_text)
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (root / "short.txt").write_text("a few words only")
    (root / "not-json.txt").write_text("{ this is : not [ json")
    (root / "typo.json").write_text(json.dumps({"method": "admm", "iterationz": 3}))
    (root / "wanda.json").write_text(json.dumps({"method": "wanda", "sparsity": 0.5}))
    (root / "inf.json").write_text('{"method": "admm", "rho": Infinity}')
    (root / "a-file").write_text("not a directory")
    (root / "no-config").mkdir()
    (root / "no-config" / "model.safetensors").write_bytes(b"")
    garbage = root / "garbage-config"
    garbage.mkdir()
    (garbage / "config.json").write_text("{ garbage")
    untyped = root / "no-model-type"
    untyped.mkdir()
    (untyped / "config.json").write_text(json.dumps({"hidden_size": 8}))
    unknown = root / "unknown-type"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "llama-from-the-future"}))
    pickled = root / "bin-only"
    pickled.mkdir()
    (pickled / "config.json").write_text((dense / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    remote = root / "remote-code"
    remote.mkdir()
    (remote / "config.json").write_text(
        json.dumps({"model_type": "custom", "auto_map": {"AutoModelForCausalLM": "modeling.Custom"}})
    )
    (remote / "model.safetensors").write_bytes(b"")
    nan = root / "nan"
    model = build_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(nan)
    tokenizer.save_pretrained(nan)
    occupied = root / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("a user's file")
    return root


@pytest.fixture
def stages(monkeypatch) -> list[str]:
    """Records ``load`` when a model's weights are loaded and ``forward`` when the first decoder block has run a
    forward (or, for a method without calibration, its first block is pruned): the line "before any expensive work"
    must not cross."""
    import transformers

    seen: list[str] = []
    real_load = transformers.AutoModelForCausalLM.from_pretrained
    real_capture = sequential._capture_inputs
    real_prune = sequential._prune_block

    def load(*args, **kwargs):
        seen.append("load")
        return real_load(*args, **kwargs)

    def capture(model, blocks, *args, **kwargs):
        handle = blocks[0].register_forward_hook(lambda *a: None if "forward" in seen else seen.append("forward"))
        try:
            return real_capture(model, blocks, *args, **kwargs)
        finally:
            handle.remove()

    def prune_block(run, index, inputs):
        if "forward" not in seen:
            seen.append("forward")
        return real_prune(run, index, inputs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(load))
    monkeypatch.setattr(sequential, "_capture_inputs", capture)
    monkeypatch.setattr(sequential, "_prune_block", prune_block)
    return seen


@dataclass
class Case:
    """One bad input: what runs, what it must raise or exit with, what the message says, how far it may get."""

    id: str
    args: list[str] = field(default_factory=list)  # CLI arguments (``{root}`` is the world directory)
    code: int = 1  # CLI exit status
    message: str = ""  # a regex the error must match (it names the flag/parameter or file and the bad value)
    stage: str = "before-load"  # "before-load": nothing loaded; "before-forward": loaded, no forward
    env: dict[str, str] = field(default_factory=dict)


def _prune(*extra: str, model: str = "{root}/dense", dataset: str = "{root}/calib.txt") -> list[str]:
    return [
        "prune",
        "--model",
        model,
        "--dataset",
        dataset,
        "--output",
        "{root}/out",
        "--num-samples",
        "2",
        "--sequence-length",
        "16",
        "--no-progress",
        *extra,
    ]


CLI_CASES = [
    # bad arguments: exit 2, before anything is loaded
    Case("sparsity-out-of-range", _prune("--sparsity", "1.5"), 2, r"--sparsity: '1\.5' is out of range"),
    Case("sparsity-not-a-number", _prune("--sparsity", "half"), 2, r"--sparsity: 'half' is not a number"),
    Case("pattern-malformed", _prune("--pattern", "2:3x"), 2, r"--pattern: .*'2:3x'"),
    Case("pattern-n-above-m", _prune("--pattern", "4:2"), 2, r"--pattern: .*'4:2'.*0 < N < M"),
    Case("num-samples-zero", _prune("--num-samples", "0"), 2, r"--num-samples: '0' is invalid"),
    Case("sequence-length-negative", _prune("--sequence-length", "-5"), 2, r"--sequence-length: '-5' is invalid"),
    Case("unknown-method", _prune("--method", "nope"), 2, r"--method: invalid choice: 'nope'"),
    Case("dtype-unknown", _prune("--dtype", "float13"), 2, r"--dtype: 'float13' is invalid; allowed: auto"),
    Case("recipe-not-json", _prune("--recipe", "{root}/not-json.txt"), 2, r"--recipe .*not-json\.txt"),
    Case("recipe-typo", _prune("--recipe", "{root}/typo.json"), 2, r"--recipe .*typo\.json: .*'iterationz'"),
    Case(
        "recipe-other-method",
        _prune("--recipe", "{root}/wanda.json", "--method", "admm"),
        2,
        r"--recipe .*wanda\.json is a 'wanda' recipe, but --method is 'admm'",
    ),
    Case("recipe-infinite-rho", _prune("--recipe", "{root}/inf.json"), 2, r"rho=inf is invalid"),
    Case("recipe-missing", _prune("--recipe", "{root}/missing.json"), 2, r"--recipe: .*missing\.json' is not"),
    Case(
        "output-occupied",
        ["prune", "--model", "{root}/dense", "--output", "{root}/occupied"],
        2,
        r"save_dir='.*occupied' is a non-empty directory",
    ),
    Case(
        "output-is-a-file",
        ["prune", "--model", "{root}/dense", "--output", "{root}/a-file"],
        2,
        r"save_dir='.*a-file' exists and is not a directory",
    ),
    Case("max-shard-size-bad", _prune("--max-shard-size", "lots"), 2, r"max_shard_size='lots' is invalid"),
    Case("push-bad-repo", _prune("--push-to-hub", "bad repo!!"), 2, r"repo_id='bad repo!!' is invalid"),
    Case(
        "max-memory-bad",
        _prune("--activation-memory", "lots"),
        2,
        r"--activation-memory: activation_memory='lots' is invalid",
    ),
    Case(
        "activation-cache-is-file",
        _prune("--activation-cache-dir", "{root}/a-file"),
        2,
        r"--activation-cache-dir: .*a-file.*is a file",
    ),
    Case(
        "max-memory-with-cache",
        _prune("--activation-memory", "1GiB", "--activation-cache-dir", "{root}/acts"),
        2,
        r"--activation-memory: not allowed with --activation-cache-dir",
    ),
    Case(
        "checkpoint-inside-output",
        _prune("--checkpoint-dir", "{root}/out/ckpt"),
        2,
        r"--checkpoint-dir: must not be --output or inside it",
    ),
    Case("execution-device-alone", _prune("--execution-device", "cpu"), 2, r"--execution-device: applies only"),
    Case(
        "streaming-with-device-map",
        _prune("--streaming", "--device-map", "auto"),
        2,
        r"--streaming: not allowed with --device-map",
    ),
    Case(
        "streaming-bad-device",
        _prune("--streaming", "--execution-device", "warp9"),
        2,
        r"--execution-device: 'warp9' is not a device",
    ),
    Case("dataset-missing", _prune(dataset="{root}/missing.txt"), 2, r"--dataset: '.*missing\.txt' does not exist"),
    Case("eval-max-tokens-zero", _prune("--eval-max-tokens", "0"), 2, r"--eval-max-tokens: '0' is invalid"),
    # the environment: exit 1, before the model is loaded
    Case(
        "model-absolute-missing",
        _prune(model="/nonexistent/models/llama"),
        1,
        r"--model /nonexistent/models/llama does not exist \(a local path: the Hub was not asked\)",
    ),
    Case("model-relative-missing", _prune(model="./models/nowhere"), 1, r"--model \./models/nowhere does not exist"),
    Case("model-no-config", _prune(model="{root}/no-config"), 1, r"--model .*no-config has no config\.json"),
    Case(
        "model-garbage-config", _prune(model="{root}/garbage-config"), 1, r"garbage-config/config\.json is not valid"
    ),
    Case("model-no-model-type", _prune(model="{root}/no-model-type"), 1, r"no-model-type/config\.json has no model_t"),
    Case(
        "model-unknown-type",
        _prune(model="{root}/unknown-type"),
        1,
        r"model_type 'llama-from-the-future' is not known to transformers",
    ),
    Case(
        "model-bin-only",
        _prune(model="{root}/bin-only"),
        1,
        r"--model .*bin-only holds only pickled weights \(pytorch_model\.bin\); optimum-admm loads safetensors",
    ),
    Case(
        "model-remote-code",
        _prune(model="{root}/remote-code"),
        1,
        r"--model .*remote-code needs custom modeling code .*--trust-remote-code",
    ),
    Case("model-is-a-file", _prune(model="{root}/a-file"), 1, r"--model .*a-file is a file"),
    Case("model-bad-id", _prune(model="not a repo!"), 1, r"--model 'not a repo!' is neither an existing directory"),
    Case(
        "model-offline-not-cached",
        _prune(model="someone/uncached-model"),
        1,
        r"--model someone/uncached-model is not in the local Hub cache, and HF_HUB_OFFLINE=1",
        "before-load",
        {"HF_HUB_OFFLINE": "1"},
    ),
    Case(
        "model-name-hub-unreachable",  # a missing relative name: said at once, not after a minute of retries
        _prune(model="my-model-dir"),
        1,
        r"--model my-model-dir is not a local directory, and the Hub cannot be reached .*if it is a local path, it "
        r"does not exist",
        "before-load",
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    ),
    Case(
        "dataset-not-utf8",
        _prune(dataset="{root}/latin1.txt"),
        1,
        r"--dataset .*latin1\.txt is not UTF-8 text: byte 0xe9 at offset 3",
    ),
    Case(
        "dataset-too-short",
        _prune(dataset="{root}/short.txt"),
        1,
        r"--dataset short\.txt: calibration_dataset is too short: \d+ tokens, but one window needs",
    ),
    Case(
        "eval-dataset-not-utf8",
        _prune("--eval-dataset", "{root}/latin1.txt"),
        1,
        r"--eval-dataset .*latin1\.txt is not UTF-8",
    ),
    Case(
        "push-without-token",
        _prune("--push-to-hub", "me/model"),
        1,
        r"needs a token .*set HF_TOKEN",
        "before-load",
        {"HF_TOKEN": "", "HF_HOME": "{root}/empty-hf-home"},
    ),
    Case(
        "output-under-a-file",
        ["prune", "--model", "{root}/dense", "--dataset", "{root}/calib.txt", "--output", "{root}/a-file/out"],
        1,
        r"--output .*a-file/out cannot be created: .*a-file is not a directory",
    ),
    # after loading, before any forward
    Case(
        "pattern-not-dividing-width",
        _prune("--pattern", "2:3"),
        2,
        r"mask_structure='2:3' needs in_features divisible by M=3",
        "before-forward",
    ),
    Case(
        "nan-weight",
        _prune(model="{root}/nan"),
        1,
        r"weight model\.layers\.1\.mlp\.up_proj\.weight holds 1 NaN or infinite values",
        "before-forward",
    ),
    Case(
        "nan-weight-magnitude",
        _prune("--method", "magnitude", model="{root}/nan"),
        1,
        r"weight model\.layers\.1\.mlp\.up_proj\.weight holds 1 NaN",
        "before-forward",
    ),
    # evaluate and shear
    Case("evaluate-model-missing", ["evaluate", "--model", "/nonexistent/model"], 1, r"--model /nonexistent/model"),
    Case("evaluate-bin-only", ["evaluate", "--model", "{root}/bin-only"], 1, r"holds only pickled weights"),
    Case(
        "evaluate-not-utf8",
        ["evaluate", "--model", "{root}/dense", "--dataset", "{root}/latin1.txt"],
        1,
        r"--dataset .*latin1\.txt is not UTF-8",
    ),
    Case(
        "evaluate-bad-sequence-length",
        ["evaluate", "--model", "{root}/dense", "--sequence-length", "x"],
        2,
        r"--sequence-length: 'x' is not an integer",
    ),
    Case(
        "shear-noop-target",
        [
            "shear",
            "--model",
            "{root}/dense",
            "--dataset",
            "{root}/calib.txt",
            "--output",
            "{root}/out",
            "--steps",
            "1",
            "--target-config",
            "num_hidden_layers=2",
        ],
        2,
        r"--target-config: the target equals",
    ),
]


def _format(value: str, root: Path) -> str:
    return value.replace("{root}", str(root))


def _run_cli_in_process(case: Case, root: Path, monkeypatch, capsys) -> tuple[int, str]:
    from huggingface_hub import constants

    from optimum_admm.commands.main import main

    for key, value in case.env.items():
        monkeypatch.setenv(key, _format(value, root))
    if "HF_HUB_OFFLINE" in case.env:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", case.env["HF_HUB_OFFLINE"] == "1")
    if "HF_ENDPOINT" in case.env:
        monkeypatch.setattr(constants, "ENDPOINT", case.env["HF_ENDPOINT"])
        # transformers caches one HfApi (and its endpoint) on first use: a fresh one for this server
        monkeypatch.setattr(importlib.import_module("transformers.utils.hub"), "_hf_api", None)
    if "HF_TOKEN" in case.env:
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(root / "no-token"))
    with pytest.raises(SystemExit) as exit_info:
        main([_format(a, root) for a in case.args])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_cli_rejects_bad_input_clearly_and_early(case, world, stages, monkeypatch, capsys):
    before = _tree_hash(world / "dense")
    code, err = _run_cli_in_process(case, world, monkeypatch, capsys)
    assert code == case.code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err  # usage + one error line at most
    assert __import__("re").search(case.message, err), err
    expected = {"before-load": [], "before-forward": ["load"]}[case.stage]
    assert stages == expected, f"got as far as {stages}"
    assert not (world / "out").exists() and not list(world.glob(".out.tmp-*"))
    assert (world / "occupied" / "keep.txt").read_text() == "a user's file"
    assert _tree_hash(world / "dense") == before


@dataclass
class ApiCase:
    id: str
    run: Any  # (world, tokenizer, text) -> None
    error: type[BaseException]
    message: str
    stage: str = "before-load"


def _pruner(world, tokenizer, config=None, model="dense"):
    return ADMMPruner.from_pretrained(
        str(world / model), config=config or ADMMConfig(num_samples=2, sequence_length=16)
    )


FAST = {"num_samples": 2, "sequence_length": 16}

API_CASES = [
    ApiCase(
        "rho-inf", lambda w, t, x: ADMMConfig(rho=float("inf")), errors.InvalidArgumentError, r"rho=inf is invalid"
    ),
    ApiCase("dampening-nan", lambda w, t, x: ADMMConfig(dampening=float("nan")), ValueError, r"dampening=nan"),
    ApiCase(
        "sparsegpt-dampening-inf",
        lambda w, t, x: SparseGPTConfig(dampening=float("inf")),
        ValueError,
        r"dampening=inf is invalid",
    ),
    ApiCase("sparsity-inf", lambda w, t, x: WandaConfig(sparsity=float("inf")), ValueError, r"sparsity=inf"),
    ApiCase(
        "strict-recipe-typo",
        lambda w, t, x: PruningConfig.from_dict({"method": "admm", "iterationz": 3}, strict=True),
        errors.InvalidArgumentError,
        r"ADMMConfig has no field 'iterationz'",
    ),
    ApiCase(
        "unknown-method",
        lambda w, t, x: PruningConfig.from_dict({"method": "nope"}),
        ValueError,
        r"method='nope' is unknown",
    ),
    ApiCase(
        "model-missing",
        lambda w, t, x: ADMMPruner.from_pretrained("/nonexistent/x"),
        errors.ModelLoadError,
        r"model_or_path /nonexistent/x does not exist",
    ),
    ApiCase("model-bin-only", lambda w, t, x: _pruner(w, t, model="bin-only"), OSError, r"only pickled weights"),
    ApiCase("model-no-config", lambda w, t, x: _pruner(w, t, model="no-config"), OSError, r"has no config\.json"),
    ApiCase(
        "model-remote-code",
        lambda w, t, x: _pruner(w, t, model="remote-code"),
        errors.ModelLoadError,
        r"trust_remote_code=True",
    ),
    ApiCase(
        "batches-3d",
        lambda w, t, x: _pruner(w, t).prune([torch.zeros(1, 1, 16, dtype=torch.long)]),
        errors.CalibrationDataError,
        r"batch 0 has shape \(1, 1, 16\); allowed: token ids of shape \(batch, "
        r"length\) \(squeeze",
        "before-forward",
    ),
    ApiCase(
        "float-token-ids",
        lambda w, t, x: _pruner(w, t).prune(torch.rand(2, 16)),
        errors.CalibrationDataError,
        r"calibration_dataset has dtype torch\.float32; allowed: integer token ids",
        "before-forward",
    ),
    ApiCase(
        "token-id-outside-vocabulary",
        lambda w, t, x: _pruner(w, t).prune(torch.full((2, 16), 9999)),
        errors.CalibrationDataError,
        r"holds token id 9999; allowed: 0 to 319",
        "before-forward",
    ),
    ApiCase(
        "unequal-batches",
        lambda w, t, x: _pruner(w, t).prune([torch.ones(1, 16, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)]),
        errors.CalibrationDataError,
        r"batch 1 has rows of 8 tokens, earlier batches 16",
        "before-forward",
    ),
    ApiCase(
        "non-string-column",
        lambda w, t, x: _pruner(w, t).prune(__import__("datasets").Dataset.from_dict({"text": [1, 2]})),
        errors.CalibrationDataError,
        r"text_column='text' holds a int at row 0",
        "before-forward",
    ),
    ApiCase(
        "missing-text-column",
        lambda w, t, x: _pruner(w, t).prune(__import__("datasets").Dataset.from_dict({"body": [x]})),
        ValueError,
        r"text_column='text' is not a column",
        "before-forward",
    ),
    ApiCase(
        "file-not-utf8",
        lambda w, t, x: _pruner(w, t).prune(str(w / "latin1.txt")),
        errors.CalibrationDataError,
        r"calibration_dataset .*latin1\.txt is not UTF-8 text",
        "before-forward",
    ),
    ApiCase(
        "text-passed-as-a-path",
        lambda w, t, x: _pruner(w, t).prune(x),
        errors.CalibrationDataError,
        r"calibration_dataset='.+?\.\.\. \(\d+ characters\)' is neither a named dataset .* put it in a list: \[text\]",
        "before-forward",
    ),
    ApiCase(
        "list-of-numbers",
        lambda w, t, x: _pruner(w, t).prune([1, 2]),
        ValueError,
        r"non-empty list of strings",
        "before-forward",
    ),
    ApiCase(
        "text-too-short",
        lambda w, t, x: _pruner(w, t).prune(["too short"]),
        errors.CalibrationDataError,
        r"too short: \d+ tokens, but one window needs sequence_length=16",
        "before-forward",
    ),
    ApiCase(
        "nan-weight",
        lambda w, t, x: _pruner(w, t, model="nan").prune([x]),
        errors.NonFiniteWeightsError,
        r"weight model\.layers\.1\.mlp\.up_proj\.weight holds 1 NaN",
        "before-forward",
    ),
    ApiCase(
        "nan-weight-wanda",
        lambda w, t, x: _pruner(w, t, WandaConfig(**FAST), "nan").prune([x]),
        ValueError,
        r"up_proj\.weight holds 1 NaN",
        "before-forward",
    ),
    ApiCase(
        "nan-weight-magnitude",
        lambda w, t, x: _pruner(w, t, MagnitudeConfig(), "nan").prune(),
        errors.NonFiniteWeightsError,
        r"up_proj\.weight holds 1 NaN",
        "before-forward",
    ),
    ApiCase(
        "save-dir-occupied",
        lambda w, t, x: _pruner(w, t).prune([x], save_dir=w / "occupied"),
        ValueError,
        r"save_dir='.*occupied' is a non-empty directory",
        "before-forward",
    ),
    ApiCase(
        "save-dir-under-a-file",
        lambda w, t, x: _pruner(w, t).prune([x], save_dir=w / "a-file" / "out"),
        errors.OutputDirectoryError,
        r"save_dir .*a-file/out cannot be created",
        "before-forward",
    ),
    ApiCase(
        "push-without-token",
        lambda w, t, x: _pruner(w, t).push_to_hub("me/model", token=False),
        errors.HubError,
        r"needs a token",
        "before-forward",
    ),
    ApiCase(
        "method-needs-data",
        lambda w, t, x: _pruner(w, t).prune(),
        ValueError,
        r"calibration_dataset=None is invalid for method 'admm'",
        "before-forward",
    ),
]


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.id)
def test_api_raises_typed_errors_early(case, world, tokenizer, corpus_text, stages):
    before = _tree_hash(world / "dense")
    with pytest.raises(case.error, match=case.message) as excinfo:
        case.run(world, tokenizer, corpus_text)
    if isinstance(excinfo.value, errors.OptimumADMMError) or case.error is ValueError:
        assert isinstance(excinfo.value, ValueError | OSError | RuntimeError)
    expected = {"before-load": [], "before-forward": ["load"]}[case.stage]
    assert [s for s in stages if s == "forward"] == [s for s in expected if s == "forward"]
    assert ("load" in stages) == ("load" in expected), stages
    assert _tree_hash(world / "dense") == before
    assert not list(world.glob(".out.tmp-*")) and not list(world.glob(".occupied.tmp-*"))


def test_the_tables_are_large_enough():
    assert len(CLI_CASES) + len(API_CASES) >= 60


def test_short_token_rows_are_used_with_a_warning(world, tokenizer):
    pruner = _pruner(world, tokenizer)
    with pytest.warns(UserWarning, match=r"hold 8 tokens per row, fewer than sequence_length=16; calibrating on 8"):
        report = pruner.prune(torch.randint(0, 300, (2, 8)), show_progress=False)
    assert report.calibration["sequence_length"] == 8


def test_shear_refuses_a_target_equal_to_the_source(world):
    from optimum_admm.structured import ShearingConfig, shear

    model = build_tiny_model("llama")
    with pytest.raises(errors.InvalidArgumentError, match="the target equals the source shape"):
        shear(model, ShearingConfig(num_hidden_layers=model.config.num_hidden_layers), train_dataset=[], max_steps=1)


CONSOLE_SCRIPT = shutil.which("optimum-admm") or str(Path(sys.executable).with_name("optimum-admm"))


def _subprocess(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [CONSOLE_SCRIPT, *args]
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


def test_real_cli_prints_one_line_and_no_traceback_unless_debug(world):
    result = _subprocess("prune", "--model", "/nonexistent/llama", "--output", str(world / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --model /nonexistent/llama does not exist (a local path: the Hub was not asked)"
    ]
    debug = _subprocess("prune", "--model", "/nonexistent/llama", "--output", str(world / "out"), "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ModelLoadError" in debug.stderr
    assert not (world / "out").exists()


def test_real_cli_names_the_datasets_offline_variable(world):
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(world / "empty-datasets")}
    result = _subprocess(
        "prune", "--model", str(world / "dense"), "--dataset", "wikitext2", "--output", str(world / "out"), env=env
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "calibration dataset 'wikitext2' cannot be loaded (HF_DATASETS_OFFLINE=1 is set" in result.stderr


_SLOW_CLI = """
import sys, time
import optimum_admm.resume as resume
real = resume.save_block
def save_then_wait(*args, **kwargs):
    real(*args, **kwargs)
    time.sleep(60)  # long enough to be interrupted after block 0 is recorded
resume.save_block = save_then_wait
from optimum_admm.commands.main import main
main(sys.argv[1:])
"""


def test_sigint_exits_130_and_the_same_command_resumes_bitwise(world, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "slow_cli.py"
    script.write_text(_SLOW_CLI)
    args = [
        "prune",
        "--model",
        str(world / "dense"),
        "--dataset",
        str(world / "calib.txt"),
        "--num-samples",
        "4",
        "--sequence-length",
        "32",
        "--no-progress",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, str(script), *args, "--output", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "ckpt" / "state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "re-run the same command to resume" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))

    resumed = _subprocess(*args, "--output", str(tmp_path / "out"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = _subprocess(
        *[a for a in args if a != "--checkpoint-dir" and a != str(tmp_path / "ckpt")],
        "--output",
        str(tmp_path / "straight"),
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    got, expected = (
        load_file(str(tmp_path / "out" / "model.safetensors")),
        load_file(str(tmp_path / "straight" / "model.safetensors")),
    )
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("this machine cannot mount a tmpfs")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("size=16k", r"--output .*: its file system has .* free, but the output needs about"),
        ("ro,size=1m", r"--output .* cannot be written \(Read-only file system"),
    ],
)
def test_a_full_or_read_only_output_is_refused_before_loading(
    options, message, world, tmp_path, stages, monkeypatch, capsys
):
    mount = tmp_path / "mnt"
    _mount_tmpfs(mount, options)
    try:
        case = Case("disk", _prune().copy(), 1, message)
        case.args[case.args.index("{root}/out")] = str(mount / "out")
        code, err = _run_cli_in_process(case, world, monkeypatch, capsys)
        assert code == 1 and "Traceback" not in err and __import__("re").search(message, err), err
        assert stages == []
        with pytest.raises(errors.OutputDirectoryError, match="save_dir"):
            _pruner(world, None).prune(["text"], save_dir=mount / "api-out")
        assert not any(mount.iterdir())
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_hub_error_on_push_is_one_line_and_the_saved_model_is_kept(world, tmp_path):
    from conftest import online_environment
    from hub_server import HubServer

    token = "hf_failures_Secret_1a2b3c"
    with HubServer({token}) as hub:
        hub.state.fail_next("POST", r"^/api/models/org/flaky/commit/", 500)
        env = {**online_environment(), "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf-home")}  # fmt: skip
        result = subprocess.run(
            [CONSOLE_SCRIPT, *[_format(a, tmp_path) for a in _prune("--push-to-hub", "org/flaky", model=str(world /
             "dense"), dataset=str(world / "calib.txt"))]],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert "model.safetensors" not in hub.state.files("org/flaky")  # nothing half-committed
    assert result.returncode == 1 and "Traceback" not in result.stderr and token not in result.stderr
    errors_printed = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors_printed) == 1, result.stderr
    assert "HTTP 500; nothing was committed" in errors_printed[0]
    assert f"the pruned model is saved in {tmp_path / 'out'}" in errors_printed[0]
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(("status", "message"), [
    (None, r"--model org/missing is neither a local directory nor a model on the Hub \(if it is private, log in"),
    (500, r"--model org/missing: the Hub answered HTTP 500; try again later"),
])  # fmt: skip
def test_a_hub_id_that_is_missing_or_failing_is_explained_before_loading(status, message, world, stages, monkeypatch,
                                                                        capsys):  # fmt: skip
    from hub_server import HubServer
    from huggingface_hub import constants

    with HubServer({"hf_x"}) as hub:
        if status is not None:
            hub.state.fail_next("GET", r"^/api/models/org/missing", status)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        # transformers caches one HfApi (and its endpoint) on first use: a fresh one for this server
        monkeypatch.setattr(importlib.import_module("transformers.utils.hub"), "_hf_api", None)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(world / "empty-hub-cache"))
        code, err = _run_cli_in_process(Case("hub", _prune(model="org/missing")), world, monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err and __import__("re").search(message, err), err
    assert stages == [] and not (world / "out").exists()


def test_a_model_whose_fused_experts_are_not_behind_the_experts_interface_is_refused_before_work_naming_them(
    tokenizer, corpus_text
):
    import warnings

    from conftest import VOCAB_SIZE
    from tiny_configs import build

    model = build("llama4_text", vocab_size=VOCAB_SIZE)  # Llama 4's experts are fused outside the interface
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer, config=WandaConfig(**FAST))
    with pytest.raises(errors.UnprunedLayersError, match=r"\d+% of the decoder blocks' weights would stay dense: "
                       r"model\.layers\.\d\.feed_forward\.experts\.\w+ .*allow_unpruned=True"):  # fmt: skip
        pruner.prune([corpus_text], show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing touched
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = pruner.prune([corpus_text], show_progress=False, allow_unpruned=True)  # deliberately
    assert any("stay dense: model.layers" in str(w.message) and "experts" in str(w.message) for w in caught)
    assert report.sparsity == pytest.approx(0.5)
