"""Sheared-LLaMA and dynamic batch loading under ``torchrun`` (gloo on 127.0.0.1): real subprocesses, 2 ranks vs 1.

One 2-rank launch and one 1-process launch of ``tests/shear_worker.py`` (about 20 s each); the 1-process launch also
resumes the checkpoints the 2-rank launch wrote. Every comparison is to float tolerance: only the order of the
summations differs between the launches.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import GLOO_ENVIRONMENT, torchrun_command

WORKER = Path(__file__).parent / "shear_worker.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend",
)


def _launch(nproc: int, out: Path, *extra: str) -> list[dict]:
    out.mkdir(parents=True)
    command = torchrun_command(nproc, WORKER, str(out), *extra)
    env = {**os.environ, **GLOO_ENVIRONMENT}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{rank}-of-{nproc}.pt") for rank in range(nproc)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shear-dist")
    two = _launch(2, root / "two")
    one = _launch(
        1,
        root / "one",
        "--resume-shear",
        two[0]["median-checkpoint"],
        "--resume-dbl",
        two[0]["dbl-checkpoint"],
    )
    return one[0], two


def _close(expected: dict, got: dict, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=rtol, atol=atol, msg=key)


def _equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_gate_gradients_do_not_depend_on_how_the_global_batch_is_split(runs):
    """Gradient accumulation 1, 2, 4 in 1 and 2 processes: the same gate and multiplier gradients."""
    one, (rank0, rank1) = runs
    reference = one["grads-ga1"]
    gates = [k for k in reference if k.startswith("gates.")]
    assert all(reference[k].abs().max() > 1e-6 for k in gates)  # the LM loss's share is in the test, not only 0
    assert all(reference[k].abs().max() > 1e-3 for k in reference if k.startswith("lagrangian."))
    for ga in (1, 2, 4):
        _close(reference, one[f"grads-ga{ga}"])
        _close(reference, rank0[f"grads-ga{ga}"])
        _equal(rank0[f"grads-ga{ga}"], rank1[f"grads-ga{ga}"])


def test_ranks_hold_the_same_gates_after_training_with_different_draws(runs):
    _, (rank0, rank1) = runs
    _equal(rank0["train"], rank1["train"])
    start = math.log(0.6 / 0.4)  # init_drop_probability=0.4: the gates moved, the ranks did not merely stay put
    gates = [v for k, v in rank0["train"].items() if k.startswith("shearing.gates.")]
    assert gates and all((v - start).abs().max() > 1e-3 for v in gates)


def test_two_ranks_train_like_one_process_and_resume_exactly_from_any_rank_count(runs):
    one, (rank0, rank1) = runs
    _equal(rank0["median"], rank1["median"])
    _close(one["median"], rank0["median"])
    _equal(rank0["median"], rank0["median-self-resumed"])  # 2 ranks resume their own checkpoint
    _close(rank0["median"], one["median-resumed"])  # 1 process resumes the 2-rank checkpoint


def test_dynamic_batch_loading_weights_agree_across_ranks_and_resume_from_any_rank_count(runs):
    one, (rank0, rank1) = runs
    assert rank0["dbl"] == rank1["dbl"]  # identical on every rank after every update
    assert rank0["dbl"][-1] != rank0["dbl"][0]  # the rule moved them
    for expected, got in zip(one["dbl"], rank0["dbl"], strict=True):
        assert got == pytest.approx(expected, abs=1e-6)
    _close(one["dbl-model"], rank0["dbl-model"])
    assert rank0["dbl-self-resumed"] == rank0["dbl"]
    _equal(rank0["dbl-model"], rank0["dbl-self-resumed-model"])
    for expected, got in zip(rank0["dbl"], one["dbl-resumed"], strict=True):
        assert got == pytest.approx(expected, abs=1e-6)
    _close(rank0["dbl-model"], one["dbl-resumed-model"])
