"""Memory benchmark of streaming mode: prune a random LLaMA checkpoint about 4x larger than its memory budget.

Builds a sharded fp32 checkpoint (one shard per block, written block by block so the builder never holds the model
either), then prunes it with :func:`optimum_admm.streaming.prune_checkpoint` in a fresh child process and reports

* its peak RSS (``VmHWM``) against the budget ``1.10 * (baseline + one block + activations + statistics)``, and
  against the stricter ``baseline + 1.10 * (one block + activations + statistics)`` (the 10% on the pruning alone):
  ``baseline`` is the child's RSS with Python, torch, transformers and the model's code imported (a ``meta``
  skeleton built, no weights) and one small matrix product run (thread pool, BLAS buffers), before any work;
  ``statistics`` what the method declared, alive at once for the four distinct inputs of a block (q/k/v, o,
  gate/up, down): Wanda's input norms, ``3 h + m`` floats, O(in) per layer;
* the same run with Wanda registered to read a full Gram matrix (``3 h^2 + m^2`` floats), which is what every
  method received before methods declared their statistic, and what ADMM and SparseGPT need (their profile is this
  one plus their per-layer solver workspace; ADMM's solve on 2 CPU cores would take hours at this size);
* the wall time and its split between loading (reading the block's tensors from the shards), computing (forwards,
  statistics, the solve) and writing (the output shards); the three add up to the wall time of the prune.

Reproduce (about 5 minutes on 2 CPU cores; builds 4 GB under --workdir)::

    python benchmarks/memory.py --output benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("benchmark")


def _status_bytes(field: str) -> int:
    """A size line of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: its peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def build_checkpoint(args, directory: Path) -> int:
    """Write a random sharded checkpoint one block at a time; returns its size in bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = _llama_config(args)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k != "lm_head.weight"}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(groups.values()):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name])
            else:
                tensors[name] = torch.randn(shapes[name], generator=generator) * 0.02
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(directory)
    return total


def child(args) -> None:
    """Run in a fresh process: prune in streaming mode and report peak RSS and timings."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from optimum_admm import WandaConfig
    from optimum_admm.streaming import prune_checkpoint

    if args.statistic == "gram":  # Wanda as every method ran before statistics were declared: a full Gram per input
        from dataclasses import dataclass
        from typing import ClassVar

        from optimum_admm.registry import get_spec, register_method

        @dataclass
        class WandaGramConfig(WandaConfig):
            method: ClassVar[str] = "wanda-gram"

        wanda = get_spec(WandaConfig())
        register_method(WandaGramConfig, wanda.prune_fn, mask_fn=wanda.mask_fn, statistic="gram")
        WandaConfig = WandaGramConfig  # noqa: N806

    torch.set_num_threads(os.cpu_count() or 1)
    with init_empty_weights():  # the baseline includes the model's code (imports), not its weights
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.source))
    # ... and the compute runtime's own start-up (OpenMP thread pool, BLAS buffers): one small product.
    torch.randn(256, 256) @ torch.randn(256, 256)
    baseline = _status_bytes("VmRSS")
    ids = torch.randint(
        0, args.vocab, (args.num_samples, args.sequence_length), generator=torch.Generator().manual_seed(0)
    )
    config = WandaConfig(sparsity=0.5, num_samples=args.num_samples, sequence_length=args.sequence_length)
    start = time.perf_counter()
    result = prune_checkpoint(args.source, args.save_dir, config, ids, overwrite=True, show_progress=False)
    wall = time.perf_counter() - start
    # VmHWM is this process's own peak. getrusage's ru_maxrss is not: Linux carries the peak of the process image
    # replaced by exec into it, and a child spawned by this benchmark's parent (which held a block while building
    # the checkpoint) would report the parent's peak whenever it is the larger.
    peak = _status_bytes("VmHWM")
    json.dump(
        {
            "baseline_rss_bytes": baseline,
            "peak_rss_bytes": peak,
            "wall_seconds": wall,
            "load_seconds": result.load_seconds,
            "compute_seconds": result.compute_seconds,
            "write_seconds": result.write_seconds,
            "prune_seconds": result.report.total_seconds,
            "sparsity": result.report.sparsity,
        },
        sys.stdout,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/optimum-admm-streaming-bench"))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--statistic", default="input_norms", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source, out = args.workdir / "source", args.workdir / "pruned"
    start = time.perf_counter()
    checkpoint_bytes = build_checkpoint(args, source)
    logger.info("built %.2f GB checkpoint in %.0fs", checkpoint_bytes / 1e9, time.perf_counter() - start)
    command = [sys.executable, __file__, "--child", "--source", str(source), "--save-dir", str(out)]
    command += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "vocab")]
    command += [f"--num-samples={args.num_samples}", f"--sequence-length={args.sequence_length}"]
    runs = []
    # Wanda with its declared statistic under glibc's default allocator, then with its mmap threshold fixed
    # (MALLOC_MMAP_THRESHOLD_: by default glibc raises the threshold after large frees and serves later temporaries
    # from the heap, which fragments); then Wanda reading full Grams, as every method did before.
    for statistic, allocator in (
        ("input_norms", {}),
        ("input_norms", {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}),
        ("gram", {}),
    ):
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, **allocator}
        completed = subprocess.run(
            [*command, f"--statistic={statistic}"], check=True, capture_output=True, text=True, env=env
        )
        runs.append({"statistic": statistic, "allocator_env": allocator, **json.loads(completed.stdout)})
        logger.info(
            "%s, allocator %s: peak RSS %.3f GB", statistic, allocator or "default", runs[-1]["peak_rss_bytes"] / 1e9
        )
    shutil.rmtree(out, ignore_errors=True)

    h, m, n, t = args.hidden, args.intermediate, args.num_samples, args.sequence_length
    block = (4 * h * h + 3 * h * m + 2 * h) * 4
    rest = (args.vocab * h + h) * 4
    activations = 2 * n * t * h * 4
    # What is alive at once for the four distinct inputs of a block (q/k/v, o, gate/up and down_proj):
    statistics = {"input_norms": (3 * h + m) * 4, "gram": (3 * h * h + m * m) * 4}
    # One pruned copy of the largest layer: what a method that updates weights (ADMM, SparseGPT) adds at least;
    # the measured Wanda zeroes weights in place and needs only a one-byte-per-weight mask.
    workspace = h * m * 4
    import accelerate
    import safetensors
    import torch
    import transformers

    def summary(run: dict) -> dict:
        pruning_set = block + activations + statistics[run["statistic"]]  # the pruning itself, baseline aside
        working_set = run["baseline_rss_bytes"] + pruning_set
        budget = 1.10 * working_set
        return {
            "statistic": run["statistic"],
            "allocator_env": run["allocator_env"],
            **{k.replace("_bytes", "_gb"): v / 1e9 for k, v in run.items() if k.endswith("_bytes")},
            "statistics_gb": statistics[run["statistic"]] / 1e9,
            "budget_gb": budget / 1e9,
            "peak_over_working_set_gb": (run["peak_rss_bytes"] - working_set) / 1e9,
            "within_budget": run["peak_rss_bytes"] <= budget,
            "strict_budget_gb": (run["baseline_rss_bytes"] + 1.10 * pruning_set) / 1e9,
            "peak_over_baseline_gb": (run["peak_rss_bytes"] - run["baseline_rss_bytes"]) / 1e9,
            "peak_over_baseline_per_pruning_set": (run["peak_rss_bytes"] - run["baseline_rss_bytes"]) / pruning_set,
            "within_strict_budget": run["peak_rss_bytes"] - run["baseline_rss_bytes"] <= 1.10 * pruning_set,
            "within_budget_with_workspace": run["peak_rss_bytes"] <= 1.10 * (working_set + workspace),
            "wall_seconds": run["wall_seconds"],
            "prune_seconds": run["prune_seconds"],
            "time_split": {k: run[f"{k}_seconds"] / run["prune_seconds"] for k in ("load", "compute", "write")},
            "seconds": {k: run[f"{k}_seconds"] for k in ("load", "compute", "write")},
            "sparsity": run["sparsity"],
        }

    results = {
        "model": {"hidden": h, "intermediate": m, "layers": args.layers, "vocab": args.vocab, "dtype": "float32"},
        "calibration": {"num_samples": n, "sequence_length": t},
        "method": "wanda 50%: its declared statistic (input norms), and registered with a full Gram for comparison",
        "checkpoint_gb": checkpoint_bytes / 1e9,
        "one_block_gb": block / 1e9,
        "non_block_gb": rest / 1e9,
        "activations_gb": activations / 1e9,
        "statistics_gb": {k: v / 1e9 for k, v in statistics.items()},
        "budget_formula": "1.10 * (baseline + one block + activations + statistics)",
        "strict_budget_formula": "baseline + 1.10 * (one block + activations + statistics)",
        "largest_layer_workspace_gb": workspace / 1e9,
        "runs": [summary(run) for run in runs],
        "checkpoint_over_peak_rss": checkpoint_bytes / runs[0]["peak_rss_bytes"],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
            "python": platform.python_version(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "safetensors": safetensors.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    logger.info(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
