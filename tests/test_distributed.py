"""Pruning with several processes: real ``torchrun --nproc_per_node 2`` subprocesses (gloo on 127.0.0.1, timeouts),
compared with one process. Each rank calibrates its share of the samples, statistics are summed over the ranks,
every layer is solved on one rank and broadcast; only the summation order differs, so weights agree within fp32
tolerance and masks exactly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import GLOO_ENVIRONMENT, build_tiny_model, torchrun_command

from optimum_admm import ADMMPruner

TESTS = Path(__file__).parent
WORKER = TESTS / "dist_worker.py"
sys.path.insert(0, str(TESTS))
import dist_worker  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend",
)


def _torchrun_command(script: str | Path, *args: str) -> list[str]:
    return torchrun_command(2, script, *args)


def _environment() -> dict[str, str]:
    return {**os.environ, **GLOO_ENVIRONMENT, "OPTIMUM_ADMM_DIST_TIMEOUT": "60"}


def _torchrun(script: str | Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = _torchrun_command(script, *args)
    return subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=timeout)


def _one_process(family: str, name: str, checkpoint_dir=None) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    model = build_tiny_model(family)
    config = dist_worker.METHODS[name]
    ids = dist_worker.calibration(model.config.vocab_size)
    ADMMPruner.from_pretrained(model, config=config).prune(ids, show_progress=False, checkpoint_dir=checkpoint_dir)
    return model.state_dict()


def _assert_close(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``got`` (parameters; tied ones once) against ``expected``: the same mask, fp32-close values."""
    assert got and set(got) <= set(expected)
    for key in got:
        assert torch.equal(expected[key] == 0, got[key] == 0), f"{key}: masks differ"
        assert torch.allclose(expected[key], got[key], rtol=1e-4, atol=1e-6), key


def test_two_ranks_prune_like_one_process_for_every_method(tmp_path):
    result = _torchrun(WORKER, str(tmp_path), "memory")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in dist_worker.METHODS:  # ADMM, SparseGPT, Wanda, ADMM 2:4
        _assert_close(_one_process("llama", name), torch.load(tmp_path / f"{name}.pt"))
    again = tmp_path / "again"
    again.mkdir()
    assert _torchrun(WORKER, str(again), "memory").returncode == 0
    for name in dist_worker.METHODS:  # the sums run in a fixed order: the same ranks give the same bits
        first, second = torch.load(tmp_path / f"{name}.pt"), torch.load(again / f"{name}.pt")
        assert all(torch.equal(first[k], second[k]) for k in first), name


def test_two_ranks_prune_a_disk_offloaded_model_like_one_process(tmp_path):
    result = _torchrun(WORKER, str(tmp_path), "offload")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _one_process("llama", "admm")
    got = torch.load(tmp_path / "admm.pt")
    _assert_close(expected, got)


def test_two_ranks_stream_a_checkpoint_and_only_rank_zero_writes(tmp_path):
    source = tmp_path / "source"
    build_tiny_model("gemma3-sliding").save_pretrained(source, max_shard_size="20KB")
    result = _torchrun(WORKER, str(tmp_path), "streaming", "--family", "gemma3-sliding", "--source", str(source))
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    streamed = {}
    for shard in (tmp_path / "streamed").glob("*.safetensors"):
        streamed.update(load_file(str(shard)))
    expected = _one_process("gemma3-sliding", "admm")
    _assert_close(expected, streamed)
    assert not list(tmp_path.glob(".streamed.tmp-*"))  # no other rank staged an output


def test_killing_one_rank_mid_run_then_resuming_with_any_rank_count(tmp_path):
    checkpoint = tmp_path / "ckpt"
    command = _torchrun_command(WORKER, str(tmp_path), "resume", "--family", "gemma3-sliding", "--checkpoint-dir",
                                str(checkpoint))  # fmt: skip
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment(),
                           start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (checkpoint / "state.json").exists() or not (tmp_path / "pid-1").exists():
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
        time.sleep(0.2)
    time.sleep(0.5)  # block 0 recorded; both ranks are inside the run
    os.kill(int((tmp_path / "pid-1").read_text()), signal.SIGKILL)
    try:
        run.communicate(timeout=120)  # torchrun stops the other rank and fails; no hang
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode != 0
    assert not (tmp_path / "admm.pt").exists()

    expected = _one_process("gemma3-sliding", "admm")
    one_rank_copy = tmp_path / "ckpt-copy"
    shutil.copytree(checkpoint, one_rank_copy)
    resumed = _torchrun(WORKER, str(tmp_path), "resume", "--family", "gemma3-sliding", "--checkpoint-dir",
                        str(checkpoint))  # the same command again, two ranks  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_close(expected, torch.load(tmp_path / "admm.pt"))
    _assert_close(expected, _one_process("gemma3-sliding", "admm", checkpoint_dir=one_rank_copy))  # one rank


def test_a_failure_on_one_rank_stops_every_rank_with_the_error(tmp_path):
    started = time.monotonic()
    result = _torchrun(WORKER, str(tmp_path), "fail", timeout=200)
    assert result.returncode != 0
    assert "injected failure on rank 1 at block 1" in result.stdout + result.stderr
    assert time.monotonic() - started < 120  # every rank ended; nobody waited for the collective timeout
    assert not (tmp_path / "admm.pt").exists()


def test_the_cli_runs_under_torchrun_unchanged(tmp_path, tokenizer, corpus_text):
    dense = tmp_path / "dense"
    build_tiny_model("llama").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    (tmp_path / "calib.txt").write_text(corpus_text)
    script = shutil.which("optimum-admm") or str(Path(sys.executable).with_name("optimum-admm"))
    common = ["prune", "--model", str(dense), "--dataset", str(tmp_path / "calib.txt"), "--num-samples", "6",
              "--sequence-length", "32", "--no-progress"]  # fmt: skip
    result = _torchrun(script, *common, "--output", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    single = subprocess.run([script, *common, "--output", str(tmp_path / "one")], capture_output=True, text=True,
                            env={**_environment(), "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    from safetensors.torch import load_file

    _assert_close(load_file(str(tmp_path / "one" / "model.safetensors")),
                  load_file(str(tmp_path / "two" / "model.safetensors")))  # fmt: skip
    assert result.stdout.count("saved to") == 1  # rank 0 alone saved and printed
