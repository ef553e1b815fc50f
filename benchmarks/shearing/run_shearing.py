"""Sheared-LLaMA at small scale on CPU: SmolLM2-135M-Instruct sheared to a fixed target on the multi-domain corpus.

1. Pruning phase: ``ShearingTrainer`` learns layer / KV-group / FFN / hidden gates for ``--prune-steps`` steps
   (weights frozen by default to fit a 2-core CPU budget; ``--prune-weights-lr`` > 0 trains them jointly as in the
   paper) and logs the expected shape every ``--log-every`` steps.
2. Finalise: ``prune_to_shape`` gives the learnt model; random and norm-based structured pruning give models of the
   identical target shape.
3. Each of the three gets the same short continued training (same data order, same token budget) with a plain
   ``transformers.Trainer``; perplexity on the corpus test split before and after.

Writes ``results/shearing-smollm2-135m.json`` and ``results/expected-shape.png``.

Run (about 5 minutes on 2 cores):
    python benchmarks/shearing/run_shearing.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from optimum_admm.corpus import load_corpus
from optimum_admm.evaluation import perplexity
from optimum_admm.structured import ShearingConfig, prune_to_shape
from optimum_admm.structured.api import pack_tokens
from optimum_admm.structured.baselines import norm_gates, random_gates
from optimum_admm.structured.training import ShearingTrainer
from optimum_admm.zoo import materialize

logger = logging.getLogger("shearing-benchmark")
HERE = Path(__file__).parent
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--target",
        default="24,384,6,2,1024",
        help="layers,hidden,heads,kv_heads,intermediate (source: 30,576,9,3,1536)",
    )
    parser.add_argument("--prune-steps", type=int, default=240)
    parser.add_argument("--prune-weights-lr", type=float, default=0.0, help="0 freezes the weights while pruning")
    parser.add_argument("--gate-lr", type=float, default=1.0)
    parser.add_argument("--lambda-lr", type=float, default=1.0)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--ct-steps", type=int, default=60, help="continued-training steps for every pruned model")
    parser.add_argument("--ct-lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--eval-sequence-length", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 behaves best on shared cores)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "shearing-smollm2-135m.json")
    parser.add_argument("--plot", type=Path, default=HERE / "results" / "expected-shape.png")
    return parser.parse_args()


def training_args(output_dir: str, steps: int, lr: float, batch_size: int, seed: int, log_every: int):
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        logging_steps=log_every,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        dataloader_num_workers=0,
    )


def evaluate(model, tokenizer, test, args) -> float:
    model.eval()
    return perplexity(
        model, tokenizer, test, sequence_length=args.eval_sequence_length, max_tokens=args.eval_tokens
    ).perplexity


def continued_training(model, data, args, tag: str) -> float:
    start = time.time()
    trainer = Trainer(
        model=model,
        train_dataset=data,
        args=training_args(
            f"/tmp/shearing-ct-{tag}", args.ct_steps, args.ct_lr, args.batch_size, args.seed, args.log_every
        ),
    )
    trainer.train()
    return time.time() - start


def prune_phase(model, config, data, args) -> tuple[object, list[dict], float]:
    if args.prune_weights_lr == 0:
        for param in model.parameters():
            param.requires_grad_(False)
    start = time.time()
    trainer = ShearingTrainer(
        model=model,
        shearing_config=config,
        train_dataset=data,
        args=training_args(
            "/tmp/shearing-prune",
            args.prune_steps,
            max(args.prune_weights_lr, 1e-12),
            args.batch_size,
            args.seed,
            args.log_every,
        ),
    )
    trainer.train()
    trainer.shearing.detach()
    history = [
        {"step": h["step"], "loss": h.get("loss"), **{k: v for k, v in h.items() if k.startswith("shear/")}}
        for h in trainer.state.log_history
        if "shear/lagrangian" in h
    ]
    for param in model.parameters():
        param.requires_grad_(True)
    return trainer.shearing, history, time.time() - start


def plot(history: list[dict], source: dict, target: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [h["step"] for h in history]
    for index, key in enumerate(SHAPE_KEYS):
        color = f"C{index}"
        ax.plot(
            steps,
            [h[f"shear/expected/{key}"] / source[key] for h in history],
            color=color,
            label=f"{key} ({source[key]}→{target[key]})",
        )
        ax.axhline(target[key] / source[key], color=color, linestyle="--", linewidth=0.8)
    ax.set_xlabel("pruning step")
    ax.set_ylabel("expected size / source size")
    ax.set_title("Sheared-LLaMA on SmolLM2-135M: expected shape (solid) vs target (dashed)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
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
        lagrangian_warmup=args.warmup,
    )
    plan = config.plan(model.config)
    train_docs = load_corpus("train").shuffle(seed=args.seed)
    test = load_corpus("test")
    prune_tokens = args.prune_steps * args.batch_size
    ct_tokens = args.ct_steps * args.batch_size
    data = pack_tokens(train_docs["text"], tokenizer, args.sequence_length, max_sequences=prune_tokens + ct_tokens)
    prune_data = data.select(range(prune_tokens))
    ct_data = data.select(range(prune_tokens, prune_tokens + ct_tokens))
    results: dict = {
        "model": args.model,
        "weights": f"{source_info.get('file')} ({source_info.get('quantization')})",
        "source_shape": plan.source,
        "target_shape": plan.target,
        "head_gating": plan.head_gating,
        "config": config.to_dict(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "tokens": {
            "prune": prune_tokens * args.sequence_length,
            "continued_training": ct_tokens * args.sequence_length,
        },
        "eval": {
            "split": "test (all domains)",
            "tokens": args.eval_tokens,
            "sequence_length": args.eval_sequence_length,
        },
    }
    start = time.time()
    results["dense_perplexity"] = evaluate(model, tokenizer, test, args)
    results["dense_parameters"] = sum(p.numel() for p in model.parameters())
    logger.info("dense perplexity %.2f (%.0fs)", results["dense_perplexity"], time.time() - start)

    calibration = torch.tensor(prune_data.select(range(8))["input_ids"])
    pruned = {
        "random": prune_to_shape(model, random_gates(plan, seed=args.seed)),
        "norm": prune_to_shape(model, norm_gates(model, plan, input_ids=calibration)),
    }
    shearing, history, prune_seconds = prune_phase(model, config, prune_data, args)
    pruned["learned"] = prune_to_shape(model, shearing)
    results["prune_seconds"] = prune_seconds
    results["history"] = history
    results["final_expected_shape"] = shearing.expected_shape()
    results["methods"] = {}
    for name in ("learned", "random", "norm"):
        small = pruned[name]
        before = evaluate(small, tokenizer, test, args)
        seconds = continued_training(small.train(), ct_data, args, name)
        after = evaluate(small, tokenizer, test, args)
        results["methods"][name] = {
            "parameters": sum(p.numel() for p in small.parameters()),
            "shape": {k: getattr(small.config, k) for k in SHAPE_KEYS},
            "perplexity_before_ct": before,
            "perplexity_after_ct": after,
            "ct_seconds": seconds,
        }
        logger.info("%s: perplexity %.2f -> %.2f after continued training", name, before, after)
    results["total_seconds"] = time.time() - start
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    plot(history, plan.source, plan.target, args.plot)
    logger.info("wrote %s and %s", args.output, args.plot)


if __name__ == "__main__":
    main()
