"""ADMM's solver alone against the GEMM rate, on one SmolLM2-135M block's shapes (no model, no driver).

The four solves of a block (q/k/v stacked 960 x 576, o 576 x 576, gate/up stacked 3072 x 576, down 576 x 1536) on
random weights and Grams, at 4/3 and 20/15 iterations, unstructured 60% and 2:4; each beside its products alone
(``iterations + 1`` ``addmm`` of the same shapes), interleaved, best of 3. FLOPs: the products plus the Cholesky
factorisation and inverse (``in^3``). One thread by default.

    python benchmarks/solve_rate.py                 # about a minute
    python benchmarks/solve_rate.py --threads 2
    python benchmarks/solve_rate.py --anatomy       # the real SmolLM2-135M prune at 4/3 under cProfile (~70 s)

``--anatomy`` splits the driver's solve phase of a real prune (60%, 4/3, seed 0 windows of ``frontier.py``) into
the solver's products, its Cholesky inverse, the mask selection, the report's reconstruction error and the rest.

Prints a markdown table and writes it to ``benchmarks/results/solve-rate.md`` with ``--write``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment  # noqa: E402

from optimum_admm.algorithms import admm_prune_group  # noqa: E402

SHAPES = [((576, 192, 192), 576), ((576,), 576), ((1536, 1536), 576), ((576,), 1536)]


def anatomy(threads: int, iterations: int = 4, mask_iterations: int = 3) -> str:
    """Where the solve phase of a real prune goes: cProfile's own time of the solver's building blocks."""
    import cProfile
    import pstats

    from _common import CACHE, admm_flops, gemm_rate, prepare
    from transformers import AutoModelForCausalLM

    from optimum_admm import ADMMConfig, ADMMPruner

    work = CACHE / "frontier" / "smollm2-135m"
    model_path = prepare("smollm2-135m", work, 1, 16, 256, 768)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    calibration = torch.load(work / "calibration-seed0.pt")
    config = ADMMConfig(sparsity=0.6, iterations=iterations, mask_iterations=mask_iterations,
                        num_samples=len(calibration), sequence_length=calibration.shape[1])  # fmt: skip
    rate = gemm_rate()
    profile = cProfile.Profile()
    profile.enable()
    report = ADMMPruner(model=model, config=config).prune(calibration, show_progress=False)
    profile.disable()
    parts = {  # (function, file suffix, time kind): cProfile's own time of the products, cumulative of the rest
        "ADMM products (addmm)": ("<built-in method torch.addmm>", "~", 2),
        "Cholesky factorisation and inverse": ("_cholesky_inverse", "admm.py", 3),
        "mask selection": ("select_mask", "masks.py", 3),
        "reconstruction error (2 products per layer)": ("relative_reconstruction_error", "stats.py", 3),
    }
    own = dict.fromkeys(parts, 0.0)
    for (filename, _, function), row in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        for part, (name, suffix, kind) in parts.items():
            if function == name and filename.endswith(suffix):
                own[part] += row[kind]
    solver = admm_flops(model, iterations)
    error = 4 * sum(m.weight.shape[0] * m.weight.shape[1] ** 2 for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".layers." in n)  # fmt: skip
    lines = [f"Real prune, 60%, {iterations}/{mask_iterations}, {threads} thread(s): wall of the phases: forward "
             f"{report.forward_seconds:.1f} s, statistics {report.statistics_seconds:.1f} s, solve "
             f"{report.solve_seconds:.1f} s. GEMM {rate / 1e9:.1f} GFLOP/s.", "",
             "| part of the solve phase | s | share |", "|---|---:|---:|"]  # fmt: skip
    for part, seconds in sorted(own.items(), key=lambda item: -item[1]):
        lines.append(f"| {part} | {seconds:.1f} | {seconds / report.solve_seconds:.0%} |")
    rest = report.solve_seconds - sum(own.values())
    lines.append(f"| the rest (element-wise passes, copies, checks, memory release) | {rest:.1f} | "
                 f"{rest / report.solve_seconds:.0%} |")  # fmt: skip
    lines += ["", f"Solver FLOPs {solver / 1e9:.0f} G: {solver / report.solve_seconds / 1e9:.1f} GFLOP/s over the "
              f"phase ({solver / report.solve_seconds / rate:.0%} of GEMM); with the error's {error / 1e9:.0f} G: "
              f"{(solver + error) / report.solve_seconds / rate:.0%} of GEMM."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--anatomy", action="store_true", help="profile the solve phase of a real SmolLM2 prune")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.anatomy:
        text = anatomy(args.threads)
        print(text)
        if args.write:
            (RESULTS / "solve-anatomy.md").write_text("# Where the solve phase goes (`benchmarks/solve_rate.py "
                                                      "--anatomy`)\n\n" + text)  # fmt: skip
        return
    generator = torch.Generator().manual_seed(0)
    block = []
    for rows, inputs in SHAPES:
        x = torch.randn(4096, inputs, generator=generator)
        block.append(([torch.randn(r, inputs, generator=generator) for r in rows], x.T @ x))
    lines = [
        "| iterations | pattern | solve ms | solve GFLOP/s | products alone GFLOP/s | solve / GEMM |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for iterations, mask_iterations in ((4, 3), (20, 15)):
        products = sum((iterations + 1) * 2 * sum(w.numel() for w in ws) * ws[0].shape[1] for ws, _ in block)
        flops = products + sum(ws[0].shape[1] ** 3 for ws, _ in block)
        for nm, sparsity in ((None, 0.6), ((2, 4), 0.5)):
            solve = gemm = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for ws, gram in block:
                    stacked, a = torch.cat(ws), gram.clone()
                    for _ in range(iterations + 1):
                        torch.addmm(stacked, stacked, a)
                gemm = min(gemm, time.perf_counter() - start)
                start = time.perf_counter()
                for ws, gram in block:
                    admm_prune_group(ws, gram, [sparsity] * len(ws), nm=nm, iterations=iterations,
                                     mask_iterations=mask_iterations)  # fmt: skip
                solve = min(solve, time.perf_counter() - start)
            pattern = "2:4" if nm else f"{sparsity:.0%}"
            lines.append(f"| {iterations}/{mask_iterations} | {pattern} | {solve * 1e3:.0f} | {flops / solve / 1e9:.1f} "
                         f"| {products / gemm / 1e9:.1f} | {flops / solve / (products / gemm):.0%} |")  # fmt: skip
    env = environment(args.threads)
    text = (
        "# ADMM's solver alone vs the GEMM rate (`benchmarks/solve_rate.py`)\n\n"
        f"One SmolLM2-135M block's four solves on random data, best of 3, interleaved. {env['machine']}; "
        f"{env['versions']}.\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    if args.write:
        (RESULTS / "solve-rate.md").write_text(text)


if __name__ == "__main__":
    main()
