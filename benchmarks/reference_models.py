"""Dense baselines: held-out perplexity of the real reference models on each corpus domain.

For every zoo model and every corpus domain, the perplexity of the first ``--tokens-per-domain`` tokens of the
domain's test split (documents joined with blank lines) in non-overlapping windows of ``--context-length`` tokens,
next to a unigram baseline on the same tokenizer: unigram probabilities from the domain's train split with add-one
smoothing, scored on exactly the tokens the model was scored on.

Run (about 3 minutes on 2 cores once the checkpoints are materialised):

    python benchmarks/reference_models.py

It writes ``benchmarks/results/reference-models.json``. The weights and the corpus live in the cache
(``~/.cache/optimum-admm`` or ``$OPTIMUM_ADMM_CACHE``), never under the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

from optimum_admm.corpus import DOMAINS, MANIFEST_PATH, SOURCES, build_corpus, load_corpus
from optimum_admm.evaluation import default_add_bos, perplexity, plan_windows, tokenize_dataset
from optimum_admm.zoo import MODELS, materialize, read_source

logger = logging.getLogger("reference_models")
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "reference-models.json"


def unigram_perplexity(train_ids: list[int], scored_ids: list[int], vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model estimated on ``train_ids``, on ``scored_ids``."""
    counts = Counter(train_ids)
    denominator = len(train_ids) + vocab_size
    nll = -sum(math.log((counts[token] + 1) / denominator) for token in scored_ids) / len(scored_ids)
    return math.exp(nll)


def scored_tokens(ids: list[int], sequence_length: int, add_bos: bool) -> list[int]:
    """The tokens :func:`optimum_admm.evaluation.perplexity` scores, in order."""
    windows = plan_windows(len(ids), sequence_length - int(add_bos), sequence_length - int(add_bos), add_bos)
    return [ids[position] for _, end, first in windows for position in range(first, end)]


def environment() -> dict:
    """Hardware and software facts for the record."""
    memory_kb = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    import torch

    packages = ["torch", "transformers", "tokenizers", "datasets", "gguf", "safetensors", "optimum-admm"]
    return {
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        # Timings are only comparable on an otherwise idle machine: the 1-minute load average says whether it was.
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "versions": {name: _version(name) for name in packages},
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def evaluate_model(name: str, args: argparse.Namespace, splits: dict) -> dict:
    """Perplexity of one model on every domain's test split, with the unigram baseline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    path = materialize(name, cache_dir=args.cache_dir)
    materialize_s = time.perf_counter() - start
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    add_bos = default_add_bos(model, tokenizer)
    result = {
        "source": read_source(path),
        "materialize_seconds": round(materialize_s, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "add_bos": add_bos,
        "domains": {},
    }
    for domain in DOMAINS:
        test_ids = tokenize_dataset(tokenizer, splits[domain]["test"], args.tokens_per_domain)
        start = time.perf_counter()
        ppl = perplexity(
            model, tokenizer, splits[domain]["test"], args.context_length, max_tokens=args.tokens_per_domain
        )
        seconds = time.perf_counter() - start
        train_ids = tokenize_dataset(tokenizer, splits[domain]["train"])
        unigram = unigram_perplexity(train_ids, scored_tokens(test_ids, args.context_length, add_bos), len(tokenizer))
        result["domains"][domain] = {
            **ppl.to_dict(),
            "unigram_perplexity": unigram,
            "train_tokens": len(train_ids),
            "seconds": round(seconds, 1),
            "tokens_per_second": round(ppl.num_tokens / seconds, 1),
        }
        logger.info("%s %s: perplexity %.2f (unigram %.1f), %.1f s", name, domain, ppl.perplexity, unigram, seconds)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(MODELS, reverse=True), choices=sorted(MODELS))
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--tokens-per-domain", type=int, default=4096)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    build_corpus(args.cache_dir)
    splits = {d: {s: load_corpus(s, [d], args.cache_dir) for s in ("train", "test")} for d in DOMAINS}
    corpus_s = time.perf_counter() - start
    record = {
        "benchmark": "dense held-out perplexity per corpus domain (test split)",
        "command": "python benchmarks/reference_models.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(),
        "context_length": args.context_length,
        "tokens_per_domain": args.tokens_per_domain,
        "protocol": (
            "test-split documents of a domain joined with '\\n\\n', tokenised once, first tokens_per_domain tokens, "
            "non-overlapping windows of context_length tokens (BOS prepended to every window when add_bos; "
            "otherwise a window's first token is context only); perplexity = exp(mean token NLL). Unigram: "
            "add-one-smoothed token frequencies of the domain's train split, on the same scored tokens."
        ),
        "corpus": {
            "manifest_sha256": hashlib.sha256(MANIFEST_PATH.read_bytes()).hexdigest(),
            "sources": SOURCES,
            "test_documents": {d: len(splits[d]["test"]) for d in DOMAINS},
            "build_seconds": round(corpus_s, 1),
        },
        "models": {},
    }
    for name in args.models:
        record["models"][name] = evaluate_model(name, args, splits)
    record["total_seconds"] = round(time.perf_counter() - start, 1)
    record["environment"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    logger.info("Wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
