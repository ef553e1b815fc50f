"""Run by ``torchrun`` in tests/test_structured_distributed.py: Sheared-LLaMA training and dynamic batch loading on
every rank of a gloo group (or in one process with ``--nproc_per_node 1``). Every rank writes what it ended with.

``python shear_worker.py OUT [--resume-shear DIR] [--resume-dbl DIR]`` runs, in one launch:

- ``grads-ga{1,2,4}``: one optimiser step over a global batch of 8 sequences split over gradient accumulation and
  the processes, with the noise-free ("median") gate draw; the gate and multiplier gradients as the optimiser sees
  them (after the shearing callback) are saved;
- ``train``: 6 steps with sampled gates, each rank reseeded differently before every step (so that the ranks' draws
  differ, as they may under any launcher); the final gates, multipliers and weights are saved;
- ``median``: 4 steps with the median draw, a checkpoint at step 2, resumed from it by a second trainer (and, with
  ``--resume-shear``, from a checkpoint written by another rank count);
- ``dbl``: 8 steps of dynamic batch loading over two synthetic domains, evaluated every 2 steps, a checkpoint at
  step 4, resumed likewise (``--resume-dbl``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_tiny_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from optimum_admm.structured import ShearingConfig  # noqa: E402
from optimum_admm.structured.dynamic_batch_loading import (  # noqa: E402
    DynamicBatchLoadingCallback,
    DynamicBatchLoadingConfig,
    MultiDomainDataset,
    PackedSequences,
    collate_packed,
)
from optimum_admm.structured.training import ShearingTrainer  # noqa: E402

# Gates start inside (0, 1) (the default start, z = 1, is flat in the LM loss), so that the LM loss's share of the
# gate gradients is tested too, not only the Lagrangian's.
TARGET = ShearingConfig(
    num_hidden_layers=1,
    hidden_size=16,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=32,
    init_drop_probability=0.4,
)
GLOBAL_BATCH = 8
SEQUENCE = 16


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def sequences(count: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, SEQUENCE), generator=generator).tolist()


def dataset(count: int, vocab: int):
    from datasets import Dataset

    rows = sequences(count, vocab, seed=11)
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def arguments(out: Path, ga: int, steps: int, **extra) -> TrainingArguments:
    _, world = rank_and_world()
    per_device = GLOBAL_BATCH // (world * ga)
    defaults = {
        "max_steps": steps,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": ga,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "optim": "sgd",
        "max_grad_norm": 0.0,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "disable_tqdm": True,
        "ddp_backend": "gloo",
        "seed": 0,
        "data_seed": 0,
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(output_dir=str(out), **{**defaults, **extra})


class Recorder(TrainerCallback):
    """The gate and multiplier gradients the optimiser is about to apply (added after the shearing callback)."""

    def __init__(self, shearing) -> None:
        self.shearing, self.gradients = shearing, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.gradients.append({k: p.grad.clone() for k, p in self.shearing.named_parameters()})


class Reseed(TrainerCallback):
    """Different draws on every rank (and every step): the gates must agree anyway."""

    def on_step_begin(self, args, state, control, **kwargs):
        rank, _ = rank_and_world()
        torch.manual_seed(1000 * (rank + 1) + state.global_step)


def shearing_trainer(out: Path, ga: int, steps: int, mode: str, data, **extra) -> ShearingTrainer:
    model = build_tiny_model("mistral-gqa").train()
    trainer = ShearingTrainer(
        model=model, args=arguments(out, ga, steps, **extra), shearing_config=TARGET, train_dataset=data
    )
    trainer.shearing.gate_mode = mode
    return trainer


def state_of(trainer) -> dict[str, torch.Tensor]:
    return {
        **{f"shearing.{k}": v.detach().clone() for k, v in trainer.shearing.state_dict().items()},
        **{f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()},
    }


def run_shearing(out: Path, resume: Path | None) -> dict:
    rank, _ = rank_and_world()
    vocab = build_tiny_model("mistral-gqa").config.vocab_size
    results: dict = {}
    for ga in (1, 2, 4):
        trainer = shearing_trainer(out / f"grads-{ga}", ga, 1, "median", dataset(GLOBAL_BATCH, vocab))
        recorder = Recorder(trainer.shearing)
        trainer.add_callback(recorder)
        trainer.train()
        results[f"grads-ga{ga}"] = recorder.gradients[0]
    trainer = shearing_trainer(out / "train", 1, 6, "sample", dataset(6 * GLOBAL_BATCH, vocab))
    trainer.add_callback(Reseed())
    trainer.train()
    results["train"] = state_of(trainer)
    data = dataset(4 * GLOBAL_BATCH, vocab)
    trainer = shearing_trainer(out / "median", 1, 4, "median", data, save_strategy="steps", save_steps=2)
    trainer.train()
    results["median"] = state_of(trainer)
    trainer = shearing_trainer(out / "median-self", 1, 4, "median", data)
    trainer.train(resume_from_checkpoint=str(out / "median" / "checkpoint-2"))
    results["median-self-resumed"] = state_of(trainer)
    if resume is not None:
        trainer = shearing_trainer(out / "median-resumed", 1, 4, "median", data)
        trainer.train(resume_from_checkpoint=str(resume))
        results["median-resumed"] = state_of(trainer)
    if rank == 0:
        results["median-checkpoint"] = str(out / "median" / "checkpoint-2")
    return results


def dbl_trainer(out: Path, vocab: int, **extra) -> tuple[Trainer, DynamicBatchLoadingCallback]:
    low, high = sequences(40, vocab // 4, seed=5), sequences(40, vocab, seed=6)
    streams = {"narrow": torch.tensor(low).flatten(), "wide": torch.tensor(high).flatten()}
    train = MultiDomainDataset(streams, SEQUENCE, weights={"narrow": 0.5, "wide": 0.5}, seed=3)
    evaluation = {name: PackedSequences(stream[: 8 * SEQUENCE], SEQUENCE) for name, stream in streams.items()}
    callback = DynamicBatchLoadingCallback(
        train, DynamicBatchLoadingConfig(reference_losses={"narrow": 3.0, "wide": 4.0}, step_size=0.3)
    )
    trainer = Trainer(
        model=build_tiny_model("llama").train(),
        args=arguments(
            out,
            1,
            8,
            eval_strategy="steps",
            eval_steps=2,
            per_device_eval_batch_size=2,
            ignore_data_skip=True,
            **extra,
        ),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collate_packed,
        callbacks=[callback],
    )
    return trainer, callback


def run_dbl(out: Path, resume: Path | None) -> dict:
    rank, _ = rank_and_world()
    vocab = build_tiny_model("llama").config.vocab_size
    trainer, callback = dbl_trainer(out / "dbl", vocab, save_strategy="steps", save_steps=4)
    trainer.train()
    results = {"dbl": [entry["weights"] for entry in callback.trajectory], "dbl-model": state_of_model(trainer)}
    trainer, callback = dbl_trainer(out / "dbl-self", vocab)
    trainer.train(resume_from_checkpoint=str(out / "dbl" / "checkpoint-4"))
    results["dbl-self-resumed"] = [entry["weights"] for entry in callback.trajectory]
    results["dbl-self-resumed-model"] = state_of_model(trainer)
    if resume is not None:
        trainer, callback = dbl_trainer(out / "dbl-resumed", vocab)
        trainer.train(resume_from_checkpoint=str(resume))
        results["dbl-resumed"] = [entry["weights"] for entry in callback.trajectory]
        results["dbl-resumed-model"] = state_of_model(trainer)
    if rank == 0:
        results["dbl-checkpoint"] = str(out / "dbl" / "checkpoint-4")
    return results


def state_of_model(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume-shear", type=Path)
    parser.add_argument("--resume-dbl", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = rank_and_world()
    results = {"world": world, **run_shearing(args.out, args.resume_shear), **run_dbl(args.out, args.resume_dbl)}
    torch.save(results, args.out / f"rank{rank}-of-{world}.pt")


if __name__ == "__main__":
    main()
