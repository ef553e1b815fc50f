"""Sheared-LLaMA's central claim at small scale: shearing + continued training vs the same shape from scratch.

SmolLM2-135M-Instruct (GGUF weights, dequantised) is sheared to the 56.6M shape (24 layers, hidden 384, 6 heads /
2 KV groups, FFN 1024) by ``ShearingTrainer`` on ``P`` pruning tokens, sliced with ``prune_to_shape`` and then
continued-trained for ``T`` tokens. The same shape, randomly initialised from the sliced config, is trained from
scratch on ``P + T`` tokens: the pruning tokens first, then the continued-training tokens, in the same order. Same
optimiser (AdamW), learning rate, schedule, batch and sequence length for every run. A third run continues training
the sheared model with dynamic batch loading (domain weights from the excess loss over the source model's own
per-domain validation losses, updated every ``--dbl-every`` steps) on the same number of tokens drawn from the
per-domain training streams.

Perplexity on the first ``--eval-tokens`` tokens of the corpus test split (all domains) is measured at several
points of ``T``, and plotted against the total tokens each model has been trained on (pruning tokens included for
the sheared model).

Run (about an hour on 2 busy cores at the defaults):

    nice -n 5 python benchmarks/shearing/from_scratch.py --threads 1

Writes ``results/from-scratch-smollm2-135m.json`` and ``results/from-scratch.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from optimum_admm.corpus import DOMAINS, load_corpus
from optimum_admm.evaluation import perplexity
from optimum_admm.structured import ShearingConfig, prune_to_shape
from optimum_admm.structured.api import pack_tokens
from optimum_admm.structured.dynamic_batch_loading import (
    DynamicBatchLoadingCallback,
    DynamicBatchLoadingConfig,
    MultiDomainDataset,
    PackedSequences,
    collate_packed,
    domain_losses,
)
from optimum_admm.structured.training import ShearingTrainer
from optimum_admm.zoo import materialize

logger = logging.getLogger("shearing-from-scratch")
HERE = Path(__file__).parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", default="24,384,6,2,1024", help="layers,hidden,heads,kv_heads,intermediate")
    parser.add_argument("--prune-steps", type=int, default=160)
    parser.add_argument("--ct-steps", type=int, default=400, help="continued-training steps (T = steps x batch)")
    parser.add_argument("--eval-points", type=int, default=6, help="perplexity checkpoints over T (0 included)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--gate-lr", type=float, default=1.0)
    parser.add_argument("--lambda-lr", type=float, default=1.0)
    parser.add_argument("--dbl-every", type=int, default=40, help="steps between DBL updates")
    parser.add_argument("--dbl-validation-tokens", type=int, default=2048, help="per domain")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--eval-sequence-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", default="sheared,sheared_dbl,scratch")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "from-scratch-smollm2-135m.json")
    parser.add_argument("--plot", type=Path, default=HERE / "results" / "from-scratch.png")
    return parser.parse_args()


def training_args(output_dir: str, steps: int, args: argparse.Namespace, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=10,
        max_grad_norm=1.0,
        weight_decay=0.0,
        dataloader_num_workers=0,
        **extra,
    )


class PerplexityAt(TrainerCallback):
    """Measure held-out perplexity when the step count reaches each of ``steps``."""

    def __init__(self, steps, measure, tokens_per_step: int, offset_tokens: int) -> None:
        self.steps, self.measure = set(steps), measure
        self.tokens_per_step, self.offset = tokens_per_step, offset_tokens
        self.points: list[dict] = []
        self.started = time.time()

    def record(self, model, step: int) -> None:
        value = self.measure(model)
        model.train()
        self.points.append(
            {
                "step": step,
                "tokens_this_run": step * self.tokens_per_step,
                "total_tokens": self.offset + step * self.tokens_per_step,
                "perplexity": value,
                "seconds": time.time() - self.started,
            }
        )
        logger.info("step %d: perplexity %.2f", step, value)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.record(model, state.global_step)


def train(model, data, args, steps, tag, measure, offset_tokens, callbacks=(), eval_dataset=None, **extra) -> dict:
    tokens_per_step = args.batch_size * args.sequence_length
    points = sorted({round(steps * i / (args.eval_points - 1)) for i in range(args.eval_points)})
    tracker = PerplexityAt([p for p in points if p > 0], measure, tokens_per_step, offset_tokens)
    tracker.record(model, 0)
    start = time.time()
    trainer = Trainer(
        model=model,
        args=training_args(f"/tmp/shearing-scratch-{tag}", steps, args, **extra),
        train_dataset=data,
        data_collator=collate_packed,
        eval_dataset=eval_dataset,
        callbacks=[tracker, *callbacks],
    )
    trainer.train()
    return {"seconds": time.time() - start, "points": tracker.points}


def prune_phase(model, config, data, args) -> tuple[object, float, list[dict]]:
    for param in model.parameters():  # weights frozen while the gates learn (CPU budget), as in run_shearing.py
        param.requires_grad_(False)
    start = time.time()
    trainer = ShearingTrainer(
        model=model,
        shearing_config=config,
        train_dataset=data,
        args=training_args("/tmp/shearing-scratch-prune", args.prune_steps, args),
    )
    trainer.train()
    trainer.shearing.detach()
    for param in model.parameters():
        param.requires_grad_(True)
    history = [h for h in trainer.state.log_history if "shear/lagrangian" in h]
    return trainer.shearing, time.time() - start, history


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run in results["runs"].items():
        points = run["points"]
        ax.plot([p["total_tokens"] for p in points], [p["perplexity"] for p in points], marker="o", label=name)
    ax.axvline(results["tokens"]["prune"], color="grey", linestyle=":", linewidth=0.8, label="end of pruning")
    ax.set_xlabel("tokens trained on (pruning tokens included)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M → 56.6M: sheared + continued training vs from scratch")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def environment() -> dict:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "optimum-admm")},
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    runs = args.runs.split(",")
    path = materialize(args.model)
    source_info = json.loads((Path(path) / "source.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    layers, hidden, heads, kv, inter = (int(v) for v in args.target.split(","))
    config = ShearingConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        gate_learning_rate=args.gate_lr,
        lambda_learning_rate=args.lambda_lr,
    )
    train_docs = load_corpus("train").shuffle(seed=args.seed)
    test = load_corpus("test")
    prune_sequences = args.prune_steps * args.batch_size
    ct_sequences = args.ct_steps * args.batch_size
    stream = pack_tokens(
        train_docs["text"], tokenizer, args.sequence_length, max_sequences=prune_sequences + ct_sequences
    )
    prune_data = stream.select(range(prune_sequences))
    ct_data = stream.select(range(prune_sequences, prune_sequences + ct_sequences))
    tokens_per_step = args.batch_size * args.sequence_length

    def measure(m) -> float:
        m.eval()
        return perplexity(
            m,
            tokenizer,
            test,
            sequence_length=args.eval_sequence_length,
            max_tokens=args.eval_tokens,
            show_progress=False,
        ).perplexity

    results: dict = {
        "model": args.model,
        "weights": f"{source_info.get('file')} ({source_info.get('quantization')})",
        "environment": environment(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "tokens": {"prune": prune_sequences * args.sequence_length, "T": ct_sequences * args.sequence_length},
        "eval": {"split": "test (all domains)", "tokens": args.eval_tokens, "window": args.eval_sequence_length},
        "runs": {},
    }
    started = time.time()
    results["dense_perplexity"] = measure(model)
    validation = {
        domain: PackedSequences(
            load_corpus("validation", domains=[domain]),
            args.sequence_length,
            tokenizer=tokenizer,
            max_tokens=args.dbl_validation_tokens,
        )
        for domain in DOMAINS
    }
    reference = domain_losses(model, validation)
    results["source_validation_losses"] = reference
    logger.info("dense perplexity %.2f, source losses %s", results["dense_perplexity"], reference)

    shearing, prune_seconds, history = prune_phase(model, config, prune_data, args)
    results["prune_seconds"] = prune_seconds
    results["final_expected_shape"] = shearing.expected_shape()
    results["gate_history"] = history
    sheared = prune_to_shape(model, shearing)
    del model
    shape_config = sheared.config
    results["parameters"] = sum(p.numel() for p in sheared.parameters())
    sheared_state = {k: v.clone() for k, v in sheared.state_dict().items()}
    offset = results["tokens"]["prune"]

    if "sheared" in runs:
        results["runs"]["sheared"] = train(sheared, ct_data, args, args.ct_steps, "sheared", measure, offset)
    if "sheared_dbl" in runs:
        sheared.load_state_dict(sheared_state)
        mixture = MultiDomainDataset(
            {d: load_corpus("train", domains=[d]) for d in DOMAINS},
            args.sequence_length,
            tokenizer=tokenizer,
            seed=args.seed,
        )
        callback = DynamicBatchLoadingCallback(mixture, DynamicBatchLoadingConfig(reference_losses=reference))
        run = train(
            sheared,
            mixture,
            args,
            args.ct_steps,
            "sheared-dbl",
            measure,
            offset,
            callbacks=[callback],
            eval_strategy="steps",
            eval_steps=args.dbl_every,
            eval_on_start=True,
            ignore_data_skip=True,
            per_device_eval_batch_size=8,
            eval_dataset=validation,
        )
        run["dbl_trajectory"] = callback.trajectory
        results["runs"]["sheared_dbl"] = run
    if "scratch" in runs:
        torch.manual_seed(args.seed)
        scratch = AutoModelForCausalLM.from_config(shape_config, dtype=torch.float32)
        scratch_data = stream.select(range(prune_sequences + ct_sequences))
        results["runs"]["scratch"] = train(
            scratch, scratch_data, args, args.prune_steps + args.ct_steps, "scratch", measure, 0
        )
    results["tokens_per_step"] = tokens_per_step
    results["total_seconds"] = time.time() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.plot)
    logger.info("wrote %s and %s", args.output, args.plot)


if __name__ == "__main__":
    main()
