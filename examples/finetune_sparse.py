"""Prune a causal LM with ADMM, fine-tune it with ``transformers.Trainer`` while keeping it sparse, and evaluate.

The three steps of a real pipeline in one script: ``ADMMPruner`` prunes the model object the script holds, the
``Trainer`` fine-tunes it on the training split of the reference corpus with ``SparsityPreservingCallback`` (the
only change to an ordinary Trainer script), and perplexity is measured on held-out text of every corpus domain
(its test split) for the dense, the pruned and the fine-tuned sparse model::

    nice -n 10 python examples/finetune_sparse.py --report-json benchmarks/results/finetune-smollm2-135m-70.json
    python examples/finetune_sparse.py --sparsity 0.5 --steps 50            # quicker
    python examples/finetune_sparse.py --model HuggingFaceTB/SmolLM2-360M --save-dir out/smollm2-360m-70-ft
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import sys
import time

import torch

from optimum_admm import ADMMConfig, ADMMPruner
from optimum_admm.evaluation import perplexity
from optimum_admm.training import SparsityPreservingCallback

logger = logging.getLogger("finetune_sparse")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="zoo name, Hub id or local checkpoint directory")
    parser.add_argument("--sparsity", type=float, default=0.7, help="fraction of zeros per pruned layer")
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--calibration-length", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of fine-tuning")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per step")
    parser.add_argument("--sequence-length", type=int, default=256, help="tokens per training window")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--train-embeddings", action="store_true", help="also train the (tied) embeddings")
    parser.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens per corpus domain")
    parser.add_argument("--eval-length", type=int, default=256, help="context length of the perplexity windows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text-file",
        default=None,
        help="use this text for calibration, training and evaluation instead of the reference corpus",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is much faster on a busy shared machine)"
    )
    parser.add_argument("--output-dir", default="out/finetune-sparse", help="Trainer output directory")
    parser.add_argument(
        "--pruned-dir",
        default=None,
        help="where the pruned model and its masks are saved; reused when it exists (default: under --output-dir)",
    )
    parser.add_argument("--save-dir", default=None, help="save the fine-tuned sparse model here")
    parser.add_argument("--report-json", default=None, help="write the measured results to this JSON file")
    return parser.parse_args(argv)


def resolve_model(name: str) -> str:
    from optimum_admm import zoo

    return str(zoo.materialize(name)) if name in zoo.MODELS else name


def text_data(args: argparse.Namespace, split: str):
    """The corpus split (all domains), or the ``--text-file`` text for every split."""
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as handle:
            return [handle.read()]
    from optimum_admm.corpus import load_corpus

    return load_corpus(split)


def held_out_sets(args: argparse.Namespace) -> dict:
    if args.text_file:
        return {"text": text_data(args, "test")}
    from optimum_admm.corpus import DOMAINS, load_corpus

    return {domain: load_corpus("test", domains=[domain]) for domain in DOMAINS}


def training_windows(tokenizer, num_windows: int, length: int, seed: int, args) -> list[dict[str, torch.Tensor]]:
    """``num_windows`` random windows of ``length`` tokens from the corpus training split (all domains)."""
    data = text_data(args, "train")
    texts = data if isinstance(data, list) else list(data["text"])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids + eos]
    chunks = torch.tensor(stream[: len(stream) // length * length]).view(-1, length)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))[:num_windows]
    return [{"input_ids": chunks[i], "labels": chunks[i]} for i in order]


def prune_or_load(model, tokenizer, args: argparse.Namespace) -> dict:
    """Prune ``model`` with ADMM and save it with its masks to ``--pruned-dir``, or load that directory."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from optimum_admm.export import read_pruning_metadata

    directory = Path(args.pruned_dir or Path(args.output_dir) / f"pruned-{args.sparsity:g}")
    reused = (directory / "masks.safetensors").is_file()
    if not reused:
        config = ADMMConfig(
            sparsity=args.sparsity,
            num_samples=args.num_samples,
            sequence_length=args.calibration_length,
            seed=args.seed,
        )
        pruner = ADMMPruner(model=model, tokenizer=tokenizer, config=config)
        pruner.prune(calibration_dataset=text_data(args, "train"), show_progress=False)
        pruner.save_pretrained(directory, save_masks=True, overwrite=True)
    else:
        logger.info("reusing the pruned model in %s", directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    metadata = read_pruning_metadata(directory)
    if metadata["config"]["sparsity"] != args.sparsity:
        raise ValueError(
            f"--pruned-dir {directory} holds sparsity {metadata['config']['sparsity']}, not {args.sparsity}"
        )
    keys = ("config", "calibration", "sparsity", "mean_relative_error")
    return {"model": model, "dir": str(directory), "reused": reused, **{k: metadata.get(k) for k in keys}}


def evaluate(model, tokenizer, held_out: dict, args: argparse.Namespace) -> dict[str, float]:
    """Perplexity per domain and over all domains (token-weighted mean NLL)."""
    model.eval()
    results, nll, tokens = {}, 0.0, 0
    for domain, dataset in held_out.items():
        r = perplexity(model, tokenizer, dataset, sequence_length=args.eval_length, max_tokens=args.eval_tokens)
        results[domain] = round(r.perplexity, 3)
        nll, tokens = nll + r.nll * r.num_tokens, tokens + r.num_tokens
    results["all"] = round(math.exp(nll / tokens), 3)
    logger.info("perplexity: %s", results)
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    set_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    held_out = held_out_sets(args)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    dense = evaluate(model, tokenizer, held_out, args)

    # 1. prune the model this script holds (or reuse a pruned copy saved by an earlier run)
    t = time.perf_counter()
    pruning = prune_or_load(model, tokenizer, args)
    model = pruning.pop("model")
    timings["prune_seconds"] = round(time.perf_counter() - t, 1)
    pruned = evaluate(model, tokenizer, held_out, args)
    # the masks of the layers ADMM pruned, as saved beside the model (masks from the exact zeros would also pick up
    # the few exact zeros that the 4-bit source checkpoint leaves in weights that were never pruned)
    callback = SparsityPreservingCallback.from_saved(pruning["dir"])
    masks = callback.masks

    # 2. fine-tune with an ordinary Trainer; the callback is the only addition
    if not args.train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)  # tied to lm_head in SmolLM2
    train_data = training_windows(tokenizer, args.steps * args.batch_size, args.sequence_length, args.seed, args)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_data, callbacks=[callback])
    t = time.perf_counter()
    train_output = trainer.train()
    timings["train_seconds"] = round(time.perf_counter() - t, 1)
    finetuned = evaluate(model, tokenizer, held_out, args)
    timings["total_seconds"] = round(time.perf_counter() - start, 1)

    params = dict(model.named_parameters())
    nonzero_pruned = sum(int((params[name].detach()[~mask] != 0).sum()) for name, mask in masks.items())
    pruned_count = sum(int((~mask).sum()) for mask in masks.values())
    total_count = sum(mask.numel() for mask in masks.values())
    gap = {k: pruned[k] - dense[k] for k in dense}
    recovered = {k: round((pruned[k] - finetuned[k]) / gap[k], 3) if gap[k] > 0 else None for k in dense}
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    results = {
        "benchmark": "ADMM pruning, then sparse fine-tuning with transformers.Trainer + SparsityPreservingCallback",
        "command": "nice -n 10 python examples/finetune_sparse.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model,
        "pruning": pruning,
        "training": {
            "data": "corpus train split, all domains, random windows",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "sequence_length": args.sequence_length,
            "tokens": args.steps * args.batch_size * args.sequence_length,
            "learning_rate": args.learning_rate,
            "schedule": f"{args.warmup_steps} warmup steps, cosine",
            "trainable": "all but the tied embeddings" if not args.train_embeddings else "all",
            "train_loss": round(train_output.training_loss, 4),
            "loss_first_logged": losses[0] if losses else None,
            "loss_last_logged": losses[-1] if losses else None,
        },
        "eval": {
            "data": "corpus test split: first eval_tokens tokens of each domain",
            "tokens_per_domain": args.eval_tokens,
            "sequence_length": args.eval_length,
        },
        "perplexity": {"dense": dense, "pruned": pruned, "pruned_finetuned": finetuned},
        "gap_recovered": recovered,
        "sparsity_check": {
            "masked_weights": len(masks),
            "pruned_entries": pruned_count,
            "fraction_pruned": round(pruned_count / total_count, 4),
            "pruned_entries_nonzero_after_training": nonzero_pruned,
        },
        "timings": timings,
        "environment": {
            "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "versions": _versions(),
        },
    }
    print(json.dumps({"perplexity": results["perplexity"], "gap_recovered": recovered}, indent=2))
    if args.report_json:
        with open(args.report_json, "w") as handle:
            json.dump(results, handle, indent=2)
            handle.write("\n")
    if args.save_dir:
        model.save_pretrained(args.save_dir)
        tokenizer.save_pretrained(args.save_dir)
    return results


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for name in ("torch", "transformers", "accelerate", "optimum-admm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


if __name__ == "__main__":
    main()
