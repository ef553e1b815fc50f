"""optimum-admm beside llm-compressor, the library a user would pick instead: same model, same calibration windows,
same evaluation tokens, same loop.

The script creates (once) its own virtualenv with llm-compressor (``--llmcompressor-version``, what the index
serves) and what it pins, on the same CPU torch, under ``~/.cache/optimum-admm/peers-venv``. Our side writes every
input: the model checkpoint (the zoo's dequantised SmolLM2-135M or Gemma-3-270M), the calibration windows of every
seed (``--num-samples`` x ``--sequence-length`` tokens drawn from the corpus training split, all domains) and the
evaluation tokens (the first ``--eval-tokens`` tokens of every domain's test split). Each run is one subprocess
(``--worker``) under the side's own interpreter, with ``--threads`` threads: it loads the checkpoint, prunes, and
measures perplexity with one plain loop (non-overlapping windows of ``--eval-length`` tokens, exp of the mean token
NLL) that is the same code on both sides. Peak RSS is the subprocess's ``ru_maxrss``. The two sides of one
(pattern, method, seed) run at the same time (``--jobs 2``), so they see the same machine load.

Settings, both sides: every ``nn.Linear`` inside the decoder blocks, ``lm_head`` left dense; SparseGPT with block
size 128 and dampening 0.01 of the mean Hessian diagonal (llm-compressor's defaults; ours, ``SparseGPTConfig``'s);
Wanda as published; llm-compressor's default sequential pipeline (inputs propagated through the pruned layers, as
ours). At ``--owl-patterns`` both sides also run OWL (``sparsity_profile="owl"``, ``owl_m=5``, lambda ``0.08``).

    python benchmarks/peers.py --model smollm2-135m          # about 35 minutes on 2 cores

Writes ``benchmarks/results/peers-<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common  # noqa: E402  (a sibling file: stdlib and torch only, so both interpreters import it)
from _common import CACHE, admm_flops, gemm_rate, plain_perplexity  # noqa: E402

VENV = CACHE / "peers-venv"
PATTERNS = ["2:4", "0.7"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patterns", nargs="+", default=PATTERNS)
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda", "admm"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=768)
    parser.add_argument("--eval-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--owl-patterns",
        nargs="*",
        default=["0.7"],
        help="unstructured patterns also run with the OWL profile, on both sides",
    )
    parser.add_argument("--llmcompressor-version", default="0.14.0.1")
    parser.add_argument(
        "--linear-targets",
        action="store_true",
        help="also llm-compressor with targets=['Linear'] (one seed), the setting that prunes lm_head",
    )
    parser.add_argument(
        "--tag", default="", help="suffix of the results files (peers-<model><tag>.*), so a run keeps the others"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a JSON file describing one run
    return parser.parse_args(argv)


# --- worker: runs under either interpreter ------------------------------------------------------------------------


def worker(spec_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32).eval()
    calibration = torch.load(work / f"calibration-seed{spec['seed']}.pt")
    pattern = spec["pattern"]
    structure = pattern if ":" in pattern else "unstructured"
    sparsity = 1 - int(pattern.split(":")[0]) / int(pattern.split(":")[1]) if ":" in pattern else float(pattern)
    start = time.perf_counter()
    timings = {}
    if spec["side"] == "optimum-admm":
        from optimum_admm import ADMMConfig, ADMMPruner, SparseGPTConfig, WandaConfig

        config_class = {"sparsegpt": SparseGPTConfig, "wanda": WandaConfig, "admm": ADMMConfig}[spec["method"]]
        profile = {"sparsity_profile": "owl", "owl_m": 5.0, "owl_lambda": 0.08} if spec.get("owl") else {}
        config = config_class(sparsity=sparsity, mask_structure=structure, num_samples=len(calibration),
                              sequence_length=calibration.shape[1], seed=spec["seed"], **profile)  # fmt: skip
        flops = admm_flops(model, config.iterations) if spec["method"] == "admm" else None
        rate = gemm_rate() if flops else None
        start = time.perf_counter()
        report = ADMMPruner(model=model, config=config).prune(calibration, show_progress=False)
        timings = {"forward": report.forward_seconds, "statistics": report.statistics_seconds,
                   "solve": report.solve_seconds, "solve_flops": flops, "gemm_flops_per_second": rate}  # fmt: skip
        settings = config.to_dict()
    else:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

        # As llm-compressor's own examples configure it: the decoder layers as targets (their linears are pruned).
        # targets=["Linear"] with ignore=["lm_head"] prunes the LM head anyway in 0.14 (each target's own name is
        # matched as "lm_head." against the ignore list), and with tied embeddings the input embedding with it.
        targets = [r"re:model.layers.\d*$"] if not spec.get("linear_targets") else ["Linear"]
        kwargs = {"sparsity": sparsity, "mask_structure": structure if ":" in pattern else "0:0",
                  "targets": targets, "ignore": ["re:.*lm_head"]}  # fmt: skip
        if spec.get("owl"):
            kwargs.update(sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)
        modifier = (SparseGPTModifier if spec["method"] == "sparsegpt" else WandaPruningModifier)(**kwargs)
        dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                     "attention_mask": torch.ones_like(calibration).tolist()})  # fmt: skip
        oneshot(model=model, dataset=dataset, recipe=[modifier], num_calibration_samples=len(calibration),
                max_seq_length=calibration.shape[1])  # fmt: skip
        settings = {k: (v if isinstance(v, (int, float, str, list, type(None))) else str(v))
                    for k, v in modifier.model_dump().items() if not k.startswith("_")}  # fmt: skip
    wall = time.perf_counter() - start
    evaluation = json.loads((work / "eval.json").read_text())
    bos = evaluation["bos"]
    perplexity = {d: plain_perplexity(model, ids, spec["eval_length"], bos) for d, ids in evaluation["ids"].items()}
    perplexity["mean"] = statistics.mean(perplexity.values())
    linear = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = sum(int((w == 0).sum()) for w in linear) / sum(w.numel() for w in linear)
    blocks: dict[str, list[int]] = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in n:
            entry = blocks.setdefault(n.split(".layers.")[1].split(".")[0], [0, 0])
            entry[0] += int((m.weight == 0).sum())
            entry[1] += m.weight.numel()
    block_sparsity = [z / t for _, (z, t) in sorted(blocks.items(), key=lambda item: int(item[0]))]
    head = model.get_output_embeddings().weight
    head_zeros = float((head == 0).float().mean())
    print("RESULT " + json.dumps({"wall": wall, "timings": timings, "perplexity": perplexity,
                                  "sparsity": zeros, "head_sparsity": head_zeros, "block_sparsity": block_sparsity,
                                  "settings": settings}))  # fmt: skip


# --- driver -------------------------------------------------------------------------------------------------------


def ensure_venv(version: str) -> Path:
    python = VENV / "bin" / "python"
    marker = VENV / f"llmcompressor-{version}.ok"
    if marker.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    # the CPU torch first, so llm-compressor's torch requirement is already met and no CUDA build is pulled
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"llmcompressor=={version}"], check=True)
    marker.write_text("ok\n")
    return python


def prepare(args, work: Path) -> str:
    return _common.prepare(args.model, work, args.seeds, args.num_samples, args.sequence_length, args.eval_tokens)


def run(python: Path, spec: dict, work: Path) -> dict:
    path = work / (
        f"spec-{spec['side']}-{spec['method']}-{spec['pattern']}-{spec['seed']}-{spec.get('owl', False)}-"
        f"{spec.get('linear_targets', False)}.json"
    )
    return _common.run_worker(python, __file__, spec, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        import atexit
        import resource

        atexit.register(lambda: print(f"PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}",
                                      file=sys.stderr))  # fmt: skip
        worker(args.worker)
        return
    peers_python = ensure_venv(args.llmcompressor_version)
    work = CACHE / "peers" / args.model
    model_path = prepare(args, work)
    sides = {"optimum-admm": Path(sys.executable), "llm-compressor": peers_python}
    specs = []  # the two sides of one setting next to each other: with --jobs 2 they run at the same time
    for seed in range(args.seeds):
        for pattern in args.patterns:
            for method in args.methods:
                variants = [{}] + ([{"owl": True}] if pattern in args.owl_patterns else [])
                variants += [{"linear_targets": True}] if args.linear_targets and seed == 0 else []
                for variant in variants:
                    for side in sides:
                        if side == "llm-compressor" and method == "admm":
                            continue
                        if variant.get("linear_targets") and side != "llm-compressor":
                            continue
                        specs.append({"side": side, "method": method, "pattern": pattern, "seed": seed,
                                      "model_path": model_path, "work": str(work), "threads": args.threads,
                                      "eval_length": args.eval_length, **variant})  # fmt: skip
    rows = []
    partial = HERE / "results" / f"peers-{args.model}{args.tag}.partial.json"
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(lambda spec: run(sides[spec["side"]], spec, work), specs):
            rows.append(row)
            partial.write_text(json.dumps(rows, indent=1) + "\n")  # what was measured survives an interruption
            print(json.dumps({k: row.get(k) for k in ("side", "method", "pattern", "seed", "wall", "error")}
                             | {"ppl": row.get("perplexity", {}).get("mean")}), flush=True)  # fmt: skip
    versions = subprocess.run([str(peers_python), "-c", "import importlib.metadata as m; print({n: m.version(n) for n in "
                               "('llmcompressor', 'compressed-tensors', 'transformers', 'torch')})"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
    from importlib import metadata

    environment = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s) per run, {args.jobs} runs at a time",
        "optimum-admm side": {n: metadata.version(n) for n in ("optimum-admm", "torch", "transformers")},
        "llm-compressor side": versions,
    }
    settings = {k: getattr(args, k) for k in ("model", "seeds", "num_samples", "sequence_length", "eval_tokens",
                                              "eval_length", "threads", "jobs")}  # fmt: skip
    out = {"environment": environment, "settings": settings, "rows": rows}
    (HERE / "results" / f"peers-{args.model}{args.tag}.json").write_text(json.dumps(out, indent=1) + "\n")
    (HERE / "results" / f"peers-{args.model}{args.tag}.md").write_text(table(out))
    partial.unlink(missing_ok=True)
    plot_owl(out, HERE / "results" / f"peers-{args.model}{args.tag}-owl.png")
    print(table(out))


def plot_owl(out: dict, path: Path) -> None:
    """Per-block sparsity of every OWL run (first seed), both sides."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in out["rows"] if r.get("owl") and r.get("seed") == 0 and "block_sparsity" in r]
    if not rows:
        return
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for row in rows:
        axis.plot(row["block_sparsity"], marker=".", label=f"{row['side']} {row['method']} {row['pattern']}")
    axis.set_xlabel("decoder block")
    axis.set_ylabel("sparsity")
    axis.set_title(f"OWL per-block sparsity, {out['settings']['model']}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def achieved(timings: list[dict]) -> str:
    """The solve's achieved GFLOP/s beside the GEMM rate measured just before, and their ratio."""
    if not timings or not all(t.get("solve_flops") and t.get("gemm_flops_per_second") for t in timings):
        return ""
    rate = statistics.mean(t["solve_flops"] / t["solve"] for t in timings) / 1e9
    gemm = statistics.mean(t["gemm_flops_per_second"] for t in timings) / 1e9
    return f"{rate:.1f} ({gemm:.1f}, {rate / gemm:.0%})"


def table(out: dict) -> str:
    groups: dict[tuple, list[dict]] = {}
    for row in out["rows"]:
        if "error" in row:
            continue
        suffix = (" (OWL)" if row.get("owl") else "") + (" (targets=Linear)" if row.get("linear_targets") else "")
        key = (row["pattern"], row["method"], row["side"] + suffix)
        groups.setdefault(key, []).append(row)
    domains = [d for d in next(iter(groups.values()))[0]["perplexity"] if d != "mean"] if groups else []
    lines = [
        f"# optimum-admm vs llm-compressor on {out['settings']['model']} (`benchmarks/peers.py`)",
        "",
        f"{out['settings']['num_samples']} x {out['settings']['sequence_length']} calibration tokens, "
        f"{out['settings']['eval_tokens']} evaluation tokens per domain; mean ± spread (max − min) over "
        f"{out['settings']['seeds']} calibration seeds. {out['environment']['machine']}. "
        f"optimum-admm side: {out['environment']['optimum-admm side']}; llm-compressor side: "
        f"{out['environment']['llm-compressor side']}.",
        "",
        "| pattern | method | library | mean ppl | "
        + " | ".join(domains)
        + " | wall s | solve s | forward s | peak RSS GiB | head zeros | solve GFLOP/s (GEMM GFLOP/s, share) |",
        "|---|---|---|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|---:|---:|",
    ]
    for (pattern, method, side), rows in sorted(groups.items()):
        means = [r["perplexity"]["mean"] for r in rows]
        spread = max(means) - min(means)
        per_domain = " | ".join(f"{statistics.mean(r['perplexity'][d] for r in rows):.1f}" for d in domains)
        timings = [r.get("timings") or {} for r in rows]
        solve = statistics.mean(t["solve"] for t in timings) if all("solve" in t for t in timings) else None
        forward = statistics.mean(t["forward"] for t in timings) if all("forward" in t for t in timings) else None
        rss = [r["peak_rss_gib"] for r in rows if r.get("peak_rss_gib")]
        lines.append(
            f"| {pattern} | {method} | {side} | {statistics.mean(means):.2f} ± {spread:.2f} | {per_domain} | "
            f"{statistics.mean(r['wall'] for r in rows):.0f} | {'' if solve is None else f'{solve:.0f}'} | "
            f"{'' if forward is None else f'{forward:.0f}'} | {max(rss) if rss else float('nan'):.2f} | "
            f"{statistics.mean(r.get('head_sparsity', 0.0) for r in rows):.0%} | {achieved(timings)} |"
        )
    errors = [r for r in out["rows"] if "error" in r]
    if errors:
        lines += [
            "",
            "Failed runs: "
            + "; ".join(
                f"{r['side']} {r['method']} {r['pattern']}{' OWL' if r.get('owl') else ''} seed {r['seed']}: {r['error']}"
                for r in errors
            ),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
