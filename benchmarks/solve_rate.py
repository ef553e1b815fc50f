"""ADMM's solver alone against the GEMM rate, on one SmolLM2-135M block's shapes (no model, no driver).

The four solves of a block (q/k/v stacked 960 x 576, o 576 x 576, gate/up stacked 3072 x 576, down 576 x 1536) on
random weights and Grams, at 4/3 and 20/15 iterations, unstructured 60% and 2:4; each beside its products alone
(``iterations + 1`` ``addmm`` of the same shapes), interleaved, best of 3. FLOPs: the products plus the Cholesky
factorisation and inverse (``in^3``). One thread by default.

    python benchmarks/solve_rate.py                 # about a minute
    python benchmarks/solve_rate.py --threads 2

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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
