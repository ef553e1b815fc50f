"""Dynamic batch loading vs a fixed mixture: continued training of a layer-pruned model on four domains.

Sheared-LLaMA's setting at toy scale, on the reference corpus (``sotu``, ``moby_dick``, ``python_docs``,
``python_code``):

1. Source model: a small LLaMA (byte-level BPE tokenizer trained here on the train split) pretrained on a
   uniform mixture of the four domains. SmolLM2-135M was the first choice but runs at 4-20 s per training step on
   this shared 2-core CPU even cut to 4 of its 30 layers (its 49k-token output layer alone is ~90 GFLOP per
   step of 4 x 128 tokens), so 150+ steps per run did not fit in 10 minutes.
2. Start checkpoint: the source with half of its layers dropped (evenly spaced, first and last kept), the same
   for every run.
3. Reference losses: the source model's own per-domain losses (as in Sheared LLaMA, where the reference is the
   source model), on the validation tokens for the updates and on the test tokens for the report.
4. Continued training from the start checkpoint, same token budget and seed, initial weights uniform:
   ``fixed`` (weights kept), ``paper`` (clipped multiplicative rule) and ``reference_code`` (unclipped softmax
   rule), updates after every evaluation (every ``--eval-steps`` steps and at step 0).
5. Report per run: test loss per domain, gap to the source's test loss, the largest gap and the spread of gaps
   (max - min), and the weight trajectory (plot).

Run (about 8 minutes on 2 busy cores: ~4 for the source, 1-2 per continued-training run):

    nice -n 10 python benchmarks/dynamic_batch_loading/run.py

Writes ``results.json`` and ``weights.png`` next to this script.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from optimum_admm.corpus import DOMAINS, load_corpus
from optimum_admm.structured.dynamic_batch_loading import (
    DynamicBatchLoadingCallback,
    DynamicBatchLoadingConfig,
    MultiDomainDataset,
    PackedSequences,
    collate_packed,
    domain_losses,
)

logger = logging.getLogger("dynamic_batch_loading")
HERE = Path(__file__).parent
EOS = "<|endoftext|>"


def train_tokenizer(train: dict, vocab_size: int, max_chars: int):
    """A byte-level BPE tokenizer trained on the first ``max_chars`` characters of each domain's train split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for dataset in train.values():
            total = 0
            for text in dataset["text"]:
                yield text
                total += len(text)
                if total > max_chars:
                    break

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def build_model(args: argparse.Namespace, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=args.source_layers,
        num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=args.hidden_size // 64,
        max_position_embeddings=args.sequence_length,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def drop_layers(model, keep: list[int]):
    """Keep only the decoder layers ``keep`` (renumbered), in place."""
    layers = [model.model.layers[i] for i in keep]
    for new_index, layer in enumerate(layers):
        layer.self_attn.layer_idx = new_index
    model.model.layers = torch.nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def train(model, data, validation, args, output_dir: str, callback=None, steps: int | None = None, lr=None):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps or args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        learning_rate=lr or args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.0,
        eval_strategy="steps" if callback else "no",
        eval_steps=args.eval_steps,
        eval_on_start=callback is not None,
        save_strategy="no",
        logging_steps=25,
        ignore_data_skip=True,
        dataloader_num_workers=0,
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=data,
        eval_dataset=validation if callback else None,
        data_collator=collate_packed,
        callbacks=[callback] if callback else [],
    )
    trainer.train()
    return trainer


def summarise(losses: dict, reference: dict) -> dict:
    gaps = {d: losses[d] - reference[d] for d in losses}
    values = np.array(list(gaps.values()))
    return {
        "losses": losses,
        "gaps": gaps,
        "largest_gap": float(values.max()),
        "largest_gap_domain": max(gaps, key=gaps.get),
        "gap_spread": float(values.max() - values.min()),
        "gap_std": float(values.std()),
        "mean_loss": float(np.mean(list(losses.values()))),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 6.4), sharex=True, squeeze=False)
    for column, (mode, run) in enumerate(runs.items()):
        updates = [e for e in run["trajectory"] if e.get("gaps")]
        steps = [e["step"] for e in run["trajectory"]]
        for domain in results["domains"]:
            axes[0, column].plot(steps, [e["weights"][domain] for e in run["trajectory"]], marker="o", label=domain)
            axes[1, column].plot(
                [e["step"] for e in updates], [e["gaps"][domain] for e in updates], marker="o", label=domain
            )
        axes[0, column].set_title(f"{mode}: largest test gap {run['test']['largest_gap']:.3f}")
        axes[0, column].set_ylabel("domain weight")
        axes[1, column].set_ylabel("validation loss - reference")
        axes[1, column].set_xlabel("step")
        axes[1, column].axhline(0.0, color="grey", linewidth=0.8)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def environment() -> dict:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "tokenizers", "optimum-admm")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["fixed", "paper", "reference_code"])
    parser.add_argument("--steps", type=int, default=200, help="continued-training steps per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--step-size", type=float, default=1.0, help="eta of both update rules")
    parser.add_argument("--validation-tokens", type=int, default=1536, help="per domain, for the updates")
    parser.add_argument("--test-tokens", type=int, default=8192, help="per domain, for the report")
    parser.add_argument("--source-steps", type=int, default=400)
    parser.add_argument("--source-layers", type=int, default=6)
    parser.add_argument("--keep-layers", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--tokenizer-chars", type=int, default=1_000_000, help="per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is ~4x faster than 2 on a shared, busy 2-core box)"
    )
    parser.add_argument("--output", type=Path, default=HERE / "results.json")
    parser.add_argument("--plot", type=Path, default=HERE / "weights.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    env = environment()

    splits = {s: {d: load_corpus(s, domains=[d]) for d in DOMAINS} for s in ("train", "validation", "test")}
    tokenizer = train_tokenizer(splits["train"], args.vocab_size, args.tokenizer_chars)
    length = args.sequence_length
    validation = {
        d: PackedSequences(ds, length, tokenizer, max_tokens=args.validation_tokens)
        for d, ds in splits["validation"].items()
    }
    test = {d: PackedSequences(ds, length, tokenizer, max_tokens=args.test_tokens) for d, ds in splits["test"].items()}

    def data(seed: int):
        return MultiDomainDataset(
            splits["train"], length, tokenizer=tokenizer, weights=[1.0] * len(DOMAINS), seed=seed
        )

    with tempfile.TemporaryDirectory(prefix="dbl-") as work:
        # 1. Source model, pretrained on a uniform mixture (another data seed than the runs).
        t0 = time.time()
        source = build_model(args, len(tokenizer))
        train(source, data(seed=1000), None, args, f"{work}/source", steps=args.source_steps, lr=2e-3)
        source_seconds = time.time() - t0
        reference = domain_losses(source, validation)
        reference_test = domain_losses(source, test)
        logger.info("Source losses: validation %s, test %s", reference, reference_test)
        # 2. Start checkpoint: half the layers, evenly spaced, first and last kept.
        keep = sorted({int(round(x)) for x in np.linspace(0, args.source_layers - 1, args.keep_layers)})
        drop_layers(source, keep).save_pretrained(f"{work}/start")
        start_losses = domain_losses(source, test)
        del source

        runs = {}
        for mode in args.modes:
            from transformers import AutoModelForCausalLM

            t0 = time.time()
            model = AutoModelForCausalLM.from_pretrained(f"{work}/start")
            rule = "constant" if mode == "fixed" else mode
            train_data = data(seed=args.seed)
            config = DynamicBatchLoadingConfig(rule=rule, reference_losses=reference, step_size=args.step_size)
            callback = DynamicBatchLoadingCallback(train_data, config)
            train(model, train_data, validation, args, f"{work}/{mode}", callback=callback)
            sequences = train_data.state_dict()["cursors"]
            runs[mode] = {
                "rule": rule,
                "seconds": round(time.time() - t0, 1),
                "test": summarise(domain_losses(model, test), reference_test),
                "trajectory": callback.trajectory,
                "sequences_per_domain": sequences,
            }
            logger.info("%s: %s", mode, json.dumps(runs[mode]["test"]))

    results = {
        "benchmark": "continued training of a layer-pruned model: fixed mixture vs dynamic batch loading",
        "command": "python benchmarks/dynamic_batch_loading/run.py " + " ".join(argv or sys.argv[1:]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "protocol": (
            f"Source: LLaMA (hidden {args.hidden_size}, {args.source_layers} layers, BPE vocab {len(tokenizer)}) pretrained {args.source_steps} steps on a uniform mixture. Start: "
            f"layers {keep} of the source. Continued training {args.steps} steps x {args.batch_size} x {length} tokens from the start checkpoint, "
            "initial weights uniform, same seed and token budget for every run. Updates after each evaluation on "
            f"{args.validation_tokens} validation tokens per domain (every {args.eval_steps} steps and at step 0). Reference losses: the source "
            f"model's own per-domain losses (validation for the updates, test for the report). Reported on {args.test_tokens} "
            "test tokens per domain."
        ),
        "domains": list(DOMAINS),
        "environment": {**env, "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "source": {"seconds": round(source_seconds, 1), "validation_losses": reference, "test_losses": reference_test},
        "start": summarise(start_losses, reference_test),
        "runs": runs,
        "seconds": round(time.time() - started, 1),
    }
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.plot)
    logger.info("Wrote %s and %s", args.output, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
