"""Pruning quality on a real (small, trained here) mixture of experts: ADMM, SparseGPT, Wanda and magnitude.

No pretrained MoE can be installed on these machines, so this trains one: a Mixtral-style decoder (4 layers, hidden
128, 8 experts of width 256, top-2 routing with the load-balancing loss; about 80% of its non-embedding weights are
experts) with a byte-level BPE tokenizer of 4,096 tokens trained on the same text, on the State of the Union and
Moby Dick training documents of the reference corpus (``optimum_admm.corpus``) for ``--train-seconds``. The trained
weights are cached under ``~/.cache/optimum-admm/moe-bench`` (not committed) and reused.

It then prunes the trained model with every method at 50%, 60%, 70% and 2:4 (every linear and every expert matrix;
routers and the head stay dense), over ``--seeds`` calibration seeds (``--num-samples`` windows of
``--sequence-length`` tokens from the training split), with routed-token statistics (the default) and, for the
calibration methods at 60% and 2:4, with every expert calibrated on every token (``calibrate_all_experts``).
Perplexity on the first ``--eval-tokens`` tokens of the held-out test split, mean and spread over the seeds.

    python benchmarks/moe.py                  # about 30 minutes on 2 CPU cores (25 of them training, once)

Writes ``benchmarks/results/moe.json`` and ``benchmarks/results/moe.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch

HERE = Path(__file__).parent
CACHE = Path.home() / ".cache" / "optimum-admm" / "moe-bench"
DOMAINS = ["sotu", "moby_dick"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-seconds", type=float, default=1500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the trained model is kept")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where moe.json/moe.md go")
    return parser.parse_args()


def text_of(split: str) -> str:
    from optimum_admm.corpus import load_corpus

    return "\n\n".join(load_corpus(split, domains=DOMAINS)["text"])


def tokenizer_for(train_text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = CACHE / "tokenizer"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(train_text.split("\n\n"), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    tokenizer.save_pretrained(path)
    return tokenizer


def model_config(vocab: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=0.02,
    )  # fmt: skip


def train(tokenizer, ids: torch.Tensor, seconds: float, sequence_length: int) -> tuple[Path, dict]:
    from transformers import MixtralForCausalLM

    path = CACHE / "model"
    if (path / "config.json").exists():
        return path, json.loads((CACHE / "training.json").read_text())
    torch.manual_seed(0)
    model = MixtralForCausalLM(model_config(len(tokenizer)))
    windows = ids[: (len(ids) // sequence_length) * sequence_length].view(-1, sequence_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    batch, step, start, losses = 16, 0, time.perf_counter(), []
    generator = torch.Generator().manual_seed(0)
    model.train()
    while (elapsed := time.perf_counter() - start) < seconds:
        lr = (
            3e-3
            * min(1.0, (step + 1) / 100)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / seconds))))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = windows[torch.randint(0, len(windows), (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss))
        step += 1
        if step % 100 == 0:
            print(f"step {step}  loss {statistics.mean(losses[-100:]):.3f}  {elapsed:.0f}s", flush=True)
    model.config.output_router_logits = False
    model.eval().save_pretrained(path)
    info = {
        "steps": step,
        "tokens": step * batch * sequence_length,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": round(statistics.mean(losses[-100:]), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "expert_parameters": sum(p.numel() for n, p in model.named_parameters() if ".experts." in n),
    }
    (CACHE / "training.json").write_text(json.dumps(info, indent=1))
    return path, info


def main() -> None:
    args = parse_args()
    global CACHE
    CACHE = args.cache
    torch.set_num_threads(args.threads)
    from transformers import MixtralForCausalLM

    from optimum_admm import ADMMConfig, ADMMPruner, MagnitudeConfig, SparseGPTConfig, WandaConfig
    from optimum_admm.evaluation import perplexity

    CACHE.mkdir(parents=True, exist_ok=True)
    if args.retrain:
        for name in ("model", "training.json"):
            target = CACHE / name
            if target.is_dir():
                import shutil

                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    train_text, test_text = text_of("train"), text_of("test")
    tokenizer = tokenizer_for(train_text)
    train_ids = tokenizer(train_text, return_tensors="pt")["input_ids"][0]
    path, training = train(tokenizer, train_ids, args.train_seconds, args.sequence_length)
    print("trained:", training, flush=True)

    def evaluate(model) -> float:
        result = perplexity(model, tokenizer, [test_text], sequence_length=args.sequence_length,
                            max_tokens=args.eval_tokens, show_progress=False)  # fmt: skip
        return round(float(result.perplexity), 3)

    def calibration(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(train_ids) - args.sequence_length, (args.num_samples,), generator=generator)
        return torch.stack([train_ids[s : s + args.sequence_length] for s in starts.tolist()])

    dense = evaluate(MixtralForCausalLM.from_pretrained(path).eval())
    print(f"dense perplexity {dense}", flush=True)
    methods = {"admm": ADMMConfig, "sparsegpt": SparseGPTConfig, "wanda": WandaConfig, "magnitude": MagnitudeConfig}
    patterns = [("50%", {"sparsity": 0.5}), ("60%", {"sparsity": 0.6}), ("70%", {"sparsity": 0.7}),
                ("2:4", {"mask_structure": "2:4"})]  # fmt: skip
    runs = []
    for label, pattern in patterns:
        for method, config_class in methods.items():
            variants = [False] + ([True] if method != "magnitude" and label in ("60%", "2:4") else [])
            for every in variants:
                seeds = range(args.seeds) if method != "magnitude" else range(1)
                values, seconds, experts_zeroed = [], [], []
                for seed in seeds:
                    model = MixtralForCausalLM.from_pretrained(path).eval()
                    config = config_class(**pattern, num_samples=args.num_samples,
                                          sequence_length=args.sequence_length, seed=seed,
                                          calibrate_all_experts=every)  # fmt: skip
                    pruner = ADMMPruner(model=model, tokenizer=tokenizer, config=config)
                    report = pruner.prune(calibration(seed) if config.needs_calibration else None, show_progress=False)
                    values.append(evaluate(model))
                    seconds.append(report.total_seconds)
                    entry = report.parameters["experts"]
                    experts_zeroed.append(entry["zeros"] / entry["total"])
                row = {
                    "pattern": label, "method": method,
                    "calibration": "all tokens" if every else ("routed" if config_class.needs_calibration else "-"),
                    "perplexity": values, "mean": round(statistics.mean(values), 3),
                    "spread": round(max(values) - min(values), 3), "seconds": round(statistics.mean(seconds), 2),
                    "experts_zeroed": round(statistics.mean(experts_zeroed), 4),
                }  # fmt: skip
                runs.append(row)
                print(json.dumps(row), flush=True)
    environment = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("torch", "transformers", "optimum-admm")},
    }
    settings = {k: getattr(args, k) for k in ("seeds", "num_samples", "sequence_length", "eval_tokens")}
    out = {"environment": environment, "settings": settings, "training": training, "dense": dense, "runs": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "moe.json").write_text(json.dumps(out, indent=1) + "\n")
    write_table(out, args.results)


#: The reading of the committed results (benchmarks/results/moe.json), kept with the script that writes the table.
READING = """
## Reading

- ADMM has the lowest perplexity at every pattern, on a model whose pruned weights are 81% experts: 60% 61.86 vs
  SparseGPT 64.47 and Wanda 69.10; 2:4 62.12 vs 63.16 and 69.75; 70% 65.05 vs 73.02 and 85.56 (dense 59.31). The
  spreads over 3 calibration seeds (at most 0.25 for ADMM, 0.3 for SparseGPT) are far below the gaps.
- Routed-token statistics beat calibrating every expert on every token for every method (60%: ADMM 61.86 vs 62.75,
  SparseGPT 64.47 vs 65.45; 2:4: 62.12 vs 63.06, 63.16 vs 64.08): an expert's reconstruction should be weighted by
  the inputs it actually sees. All-token calibration is an option for experts that receive few tokens, not a default.
- Wanda leaves 59.5% / 69.7% instead of 60% / 70% because it selects per output row and rounds down to whole weights
  on rows of 128 or 256 inputs.
- Seconds are not comparable between rows: most runs shared the 2 cores with other jobs (the architecture sweep and
  the test suite); the 50% SparseGPT and Wanda rows ran beside the sweep.
"""


def write_table(out: dict, results: Path) -> None:
    lines = [
        "# Pruning a trained mixture of experts (`benchmarks/moe.py`)",
        "",
        f"Mixtral-style, {out['training']['parameters']:,} parameters ({out['training']['expert_parameters']:,} in "
        f"8 experts per layer, top-2), trained here for {out['training']['tokens']:,} tokens "
        f"({out['training']['seconds']:.0f} s); dense perplexity {out['dense']} on {out['settings']['eval_tokens']:,} "
        f"held-out tokens. {out['settings']['num_samples']} x {out['settings']['sequence_length']} calibration "
        f"tokens, mean (spread) over {out['settings']['seeds']} calibration seeds. {out['environment']}.",
        "",
        "| pattern | method | expert statistics | perplexity | spread | experts zeroed | seconds |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in out["runs"]:
        lines.append(
            f"| {row['pattern']} | {row['method']} | {row['calibration']} | {row['mean']:.2f} | {row['spread']:.2f} | "
            f"{row['experts_zeroed']:.1%} | {row['seconds']:.1f} |"
        )
    (results / "moe.md").write_text("\n".join(lines) + "\n" + READING)


if __name__ == "__main__":
    main()
