"""ADMM's time-quality frontier beside SparseGPT and Wanda, and what each removal of waste in the solve and the driver
is worth.

Frontier (default): for every calibration seed and pattern, ADMM at several ``iterations/mask_iterations`` settings
(and the constant schedule at one), SparseGPT and Wanda, one run after the other (interleaved, so they see the same
machine load), each a fresh subprocess with ``--threads`` threads that loads the checkpoint, prunes and measures
perplexity with the same plain loop and the same inputs as ``peers.py`` (calibration windows of the corpus training
split, the first ``--eval-tokens`` tokens of every domain's test split). Per run: wall time of the prune, its
forward / statistics / solve split (the report's phase timer), peak RSS, and for ADMM the solve's FLOP/s beside a
``torch.mm`` of the same shape measured just before it.

    python benchmarks/frontier.py --model smollm2-135m                 # about 30 minutes on 2 cores
    python benchmarks/frontier.py --model smollm2-135m --ablations     # about 8 minutes

Writes ``benchmarks/results/frontier-<model>.{json,md,png}`` (``--ablations``: ``speed-<model>.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CACHE,
    RESULTS,
    admm_flops,
    environment,
    evaluate,
    gemm_rate,
    mean_spread,
    prepare,
    run_worker,
)

VARIANTS = [
    "sparsegpt",
    "wanda",
    "admm:4/3",
    "admm:6/4",
    "admm:10/8",
    "admm:20/15",
    "admm:40/30",
    "admm-constant:10/8",
]
PATTERNS = ["0.6", "2:4"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patterns", nargs="+", default=PATTERNS)
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=768)
    parser.add_argument("--eval-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ablations", action="store_true", help="measure the solve and driver changes instead")
    parser.add_argument("--repeats", type=int, default=2, help="--ablations: interleaved repeats of each variant")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results files go")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def config_for(variant: str, pattern: str, calibration, seed: int, batch: int):
    from optimum_admm import ADMMConfig, SparseGPTConfig, WandaConfig

    method, _, iterations = variant.partition(":")
    structure = pattern if ":" in pattern else "unstructured"
    common = {"sparsity": None if ":" in pattern else float(pattern), "mask_structure": structure,
              "num_samples": len(calibration), "sequence_length": calibration.shape[1], "seed": seed,
              "calibration_batch_size": batch}  # fmt: skip
    if method == "sparsegpt":
        return SparseGPTConfig(**common)
    if method == "wanda":
        return WandaConfig(**common)
    total, mask = (int(v) for v in iterations.split("/"))
    schedule = "constant" if method == "admm-constant" else "cubic"
    return ADMMConfig(iterations=total, mask_iterations=mask, schedule=schedule, **common)


def worker(spec_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_admm import ADMMPruner, sequential

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    if not spec.get("group", True):
        sequential.GROUP_SOLVE_ELEMENTS = 0  # every layer solved alone
    work = Path(spec["work"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32).eval()
    calibration = torch.load(work / f"calibration-seed{spec['seed']}.pt")
    config = config_for(spec["variant"], spec["pattern"], calibration, spec["seed"], spec.get("batch", 8))
    is_admm = spec["variant"].startswith("admm")
    rate = gemm_rate() if is_admm else None
    start = time.perf_counter()
    report = ADMMPruner(model=model, config=config).prune(calibration, show_progress=False)
    wall = time.perf_counter() - start
    flops = admm_flops(model, config.iterations) if is_admm else None
    result = {
        "wall": wall,
        "forward": report.forward_seconds,
        "statistics": report.statistics_seconds,
        "solve": report.solve_seconds,
        "solve_flops": flops,
        "solve_flops_per_second": flops / report.solve_seconds if flops else None,
        "gemm_flops_per_second": rate,
        "perplexity": evaluate(model, work, spec["eval_length"]),
        "sparsity": report.sparsity,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "settings": config.to_dict(),
    }
    print("RESULT " + json.dumps(result))


def run(spec: dict, work: Path) -> dict:
    path = work / f"spec-{spec['variant'].replace('/', '-')}-{spec['pattern']}-{spec['seed']}.json"
    return {**run_worker(sys.executable, __file__, spec, path), "load_average": os.getloadavg()[0]}


def _rows(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in results:
        if "error" not in row:
            grouped.setdefault((row["pattern"], row["variant"]), []).append(row)
    return grouped


def markdown(payload: dict) -> str:
    args, env = payload["args"], payload["environment"]
    lines = [
        f"# ADMM's time-quality frontier on {args['model']} (`benchmarks/frontier.py`)",
        "",
        f"{args['num_samples']} x {args['sequence_length']} calibration tokens, {args['eval_tokens']} evaluation tokens "
        f"per domain (4 domains); mean ± spread (max − min) over {args['seeds']} calibration seeds, runs interleaved. "
        f"{env['machine']}; {env['versions']}.",
        "",
        "| pattern | method | iterations / mask iterations | mean ppl | wall s | forward s | solve s | solve GFLOP/s "
        "| GEMM GFLOP/s | solve / GEMM | peak RSS GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (pattern, variant), rows in _rows(payload["results"]).items():
        ppl, ppl_spread = mean_spread([r["perplexity"]["mean"] for r in rows])
        wall, wall_spread = mean_spread([r["wall"] for r in rows])
        method, _, iterations = variant.partition(":")
        cells = [pattern, method, iterations or "–", f"{ppl:.2f} ± {ppl_spread:.2f}", f"{wall:.1f} ± {wall_spread:.1f}",
                 f"{mean_spread([r['forward'] for r in rows])[0]:.1f}", f"{mean_spread([r['solve'] for r in rows])[0]:.1f}"]  # fmt: skip
        if rows[0].get("solve_flops_per_second"):
            solve = mean_spread([r["solve_flops_per_second"] for r in rows])[0]
            gemm = mean_spread([r["gemm_flops_per_second"] for r in rows])[0]
            cells += [f"{solve / 1e9:.1f}", f"{gemm / 1e9:.1f}", f"{solve / gemm:.0%}"]
        else:
            cells += ["", "", ""]
        cells.append(f"{max(r['peak_rss_gib'] for r in rows):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = payload["args"]["patterns"]
    fig, axes = plt.subplots(1, len(patterns), figsize=(5.5 * len(patterns), 4.2), squeeze=False)
    grouped = _rows(payload["results"])
    for ax, pattern in zip(axes[0], patterns, strict=True):
        admm = sorted(((mean_spread([r["wall"] for r in rows])[0], mean_spread([r["perplexity"]["mean"] for r in rows]),
                        variant) for (p, variant), rows in grouped.items() if p == pattern and variant.startswith("admm:")))  # fmt: skip
        if admm:
            ax.errorbar([a[0] for a in admm], [a[1][0] for a in admm], yerr=[a[1][1] / 2 for a in admm], marker="o",
                        label="ADMM (cubic)", capsize=3)  # fmt: skip
            for wall, (ppl, _), variant in admm:
                ax.annotate(
                    variant.partition(":")[2], (wall, ppl), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
        for (p, variant), rows in grouped.items():
            if p != pattern or variant.startswith("admm:"):
                continue
            wall = mean_spread([r["wall"] for r in rows])[0]
            ppl, spread = mean_spread([r["perplexity"]["mean"] for r in rows])
            ax.errorbar([wall], [ppl], yerr=[spread / 2], marker="s", linestyle="none", label=variant, capsize=3)
        ax.set_title(f"{payload['args']['model']}, {pattern}")
        ax.set_xlabel("prune wall time (s)")
        ax.set_ylabel("mean perplexity (4 domains)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def gram_rate(repeats: int = 20) -> dict:
    """The Gram accumulation (:class:`~optimum_admm.stats.GramAccumulator`) beside a plain ``addmm`` of the same
    contiguous fp32 inputs: a block's batch of 8 x 256 tokens of width 576 and 1536, interleaved."""
    import torch

    from optimum_admm.stats import GramAccumulator

    out = {}
    for width in (576, 1536):
        x = torch.randn(8, 256, width)
        accumulator = GramAccumulator(width)
        flat = x.reshape(-1, width).contiguous()
        gram = torch.zeros(width, width)
        times = {"accumulator": 0.0, "addmm": 0.0}
        for repeat in range(repeats + 1):  # the first round warms up
            start = time.perf_counter()
            accumulator.add(x)
            middle = time.perf_counter()
            gram.addmm_(flat.T, flat)
            end = time.perf_counter()
            if repeat:
                times["accumulator"] += middle - start
                times["addmm"] += end - middle
        flops = 2 * flat.shape[0] * width * width * repeats
        out[str(width)] = {k: flops / v for k, v in times.items()}
    return out


def solve_anatomy(threads: int, repeats: int = 3) -> dict:
    """One ADMM solve of a stacked q/k/v (960 x 576) at 20/15 iterations: its time beside the time of its 21 products
    alone, and the solve with its three layers apart."""
    import torch

    from optimum_admm.algorithms import admm_prune, admm_prune_group

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 576, generator=generator)
    gram = x.T @ x
    weights = [torch.randn(rows, 576, generator=generator) for rows in (576, 192, 192)]
    stacked = torch.cat(weights)
    a_inv = torch.linalg.inv(gram + torch.eye(576))
    timings = {"group": [], "separate": [], "products": []}
    for _ in range(repeats):
        start = time.perf_counter()
        admm_prune_group(weights, gram, [0.6] * 3)
        timings["group"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for w in weights:
            admm_prune(w, gram, 0.6)
        timings["separate"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(21):
            torch.addmm(stacked, stacked, a_inv)
        timings["products"].append(time.perf_counter() - start)
    flops = 21 * 2 * stacked.shape[0] * 576 * 576
    best = {k: min(v) for k, v in timings.items()}
    return {"seconds": best, "products_share_of_group_solve": best["products"] / best["group"],
            "group_flops_per_second": flops / best["group"], "gemm_flops_per_second": flops / best["products"]}  # fmt: skip


def ablations(args, work: Path, model_path: str) -> None:
    variants = [
        {"name": "admm 20/15: grouped, batch 8 (default)", "variant": "admm:20/15", "group": True, "batch": 8},
        {"name": "admm 20/15: layers alone, batch 8", "variant": "admm:20/15", "group": False, "batch": 8},
        {"name": "admm 20/15: grouped, batch 1", "variant": "admm:20/15", "group": True, "batch": 1},
        {"name": "admm 20/15: layers alone, batch 1 (before)", "variant": "admm:20/15", "group": False, "batch": 1},
        {"name": "sparsegpt: grouped, batch 8 (default)", "variant": "sparsegpt", "group": True, "batch": 8},
        {"name": "sparsegpt: layers alone, batch 1 (before)", "variant": "sparsegpt", "group": False, "batch": 1},
    ]
    results = []
    for repeat in range(args.repeats):
        for v in variants:
            spec = {**v, "pattern": "0.6", "seed": 0, "model_path": model_path, "work": str(work),
                    "threads": args.threads, "eval_length": args.eval_length, "repeat": repeat}  # fmt: skip
            row = run(spec, work)
            results.append(row)
            print(json.dumps({k: row.get(k) for k in ("name", "wall", "forward", "solve", "error")}), flush=True)
    payload = {"args": vars(args) | {"worker": None, "out": str(args.out)}, "environment": environment(args.threads),
               "runs": results, "gram_accumulation": gram_rate(), "solve_anatomy": solve_anatomy(args.threads)}  # fmt: skip
    stem = args.out / f"speed-{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    lines = [
        f"# Waste removed from the solve and the driver, on {args.model} (`benchmarks/frontier.py --ablations`)",
        "",
        f"60%, seed 0, {args.num_samples} x {args.sequence_length} calibration tokens; best of {args.repeats} "
        f"interleaved runs. {payload['environment']['machine']}; {payload['environment']['versions']}.",
        "",
        "| variant | wall s | forward s | statistics s | solve s | mean ppl |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        rows = [r for r in results if r["name"] == v["name"] and "error" not in r]
        if rows:
            best = min(rows, key=lambda r: r["wall"])
            lines.append(f"| {v['name']} | {best['wall']:.1f} | {best['forward']:.1f} | {best['statistics']:.1f} | "
                         f"{best['solve']:.1f} | {best['perplexity']['mean']:.2f} |")  # fmt: skip
    gram = payload["gram_accumulation"]
    lines += ["", "Gram accumulation (GFLOP/s, 8 x 256 tokens per call):", "",
              "| width | GramAccumulator.add | plain addmm |", "|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {w} | {r['accumulator'] / 1e9:.1f} | {r['addmm'] / 1e9:.1f} |" for w, r in gram.items()]
    anatomy = payload["solve_anatomy"]
    lines += ["", "One ADMM solve of a stacked q/k/v (960 x 576, 20/15 iterations, best of 3):", "",
              f"- grouped {anatomy['seconds']['group']:.3f} s, the three layers apart {anatomy['seconds']['separate']:.3f} s,"
              f" its 21 products alone {anatomy['seconds']['products']:.3f} s",
              f"- solve {anatomy['group_flops_per_second'] / 1e9:.1f} GFLOP/s vs GEMM {anatomy['gemm_flops_per_second'] / 1e9:.1f}"
              f" GFLOP/s: {anatomy['products_share_of_group_solve']:.0%} of the GEMM rate"]  # fmt: skip
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(stem.with_suffix(".md").read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return
    work = CACHE / "frontier" / args.model
    model_path = prepare(args.model, work, args.seeds, args.num_samples, args.sequence_length, args.eval_tokens)
    if args.ablations:
        ablations(args, work, model_path)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"frontier-{args.model}"
    results = []
    for seed in range(args.seeds):
        for pattern in args.patterns:
            for variant in args.variants:
                spec = {"variant": variant, "pattern": pattern, "seed": seed, "model_path": model_path,
                        "work": str(work), "threads": args.threads, "eval_length": args.eval_length}  # fmt: skip
                row = run(spec, work)
                results.append(row)
                print(json.dumps({k: row.get(k) for k in ("variant", "pattern", "seed", "wall", "error")}
                                 | {"ppl": row.get("perplexity", {}).get("mean")}), flush=True)  # fmt: skip
                payload = {"args": vars(args) | {"worker": None, "out": str(args.out)}, "environment": environment(args.threads),
                           "results": results}  # fmt: skip
                stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(payload))
    plot(payload, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
