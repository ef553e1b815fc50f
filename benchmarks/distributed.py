"""Wall time of a prune against the number of processes (``torchrun``), on this machine's CPU cores.

Builds a random LLaMA (seeded, saved once under ``--workdir``), then prunes it with ADMM 50% in fresh processes,
interleaved over ``--rounds`` rounds so that a noisy machine affects every setting alike:

* 1 process, 1 thread;
* 2 processes (``torchrun --nproc_per_node 2``, gloo on 127.0.0.1), 1 thread each: the calibration samples are
  sharded, the statistics all-reduced, each layer solved on one rank and broadcast;
* 1 process, 2 threads: the same two cores used by one process (the fair comparison on a 2-core machine).

For each setting: the median wall time, the split into forward, statistics, solve and communication seconds (rank 0),
the layers' mean relative reconstruction error, and the largest weight difference and mask disagreement against the
1-process, 1-thread result (ADMM's mask flips at near-tied weights under any change of summation order: compare the
1-process, 2-thread row, which differs from it by its BLAS threads alone). Results go to
``benchmarks/results/distributed-cpu.json``.

Reproduce (about 5 minutes on 2 CPU cores)::

    python benchmarks/distributed.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _llama(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config)


def child(args) -> None:
    """One prune (under torchrun: one rank of it); rank 0 writes the timings and the weights."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from optimum_admm import ADMMConfig, ADMMPruner
    from optimum_admm.distributed import current, init_from_environment

    init_from_environment()
    model = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.num_samples, args.sequence_length), generator=generator)
    config = ADMMConfig(sparsity=0.5, num_samples=args.num_samples, sequence_length=args.sequence_length)
    start = time.perf_counter()
    report = ADMMPruner.from_pretrained(model, config=config).prune(ids, show_progress=False)
    wall = time.perf_counter() - start
    if current().is_main:
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if "layers" in k}, str(args.weights))
        timings = {
            "wall_seconds": wall,
            "forward_seconds": report.forward_seconds,
            "statistics_seconds": report.statistics_seconds,
            "solve_seconds": report.solve_seconds,
            "communication_seconds": report.communication_seconds,
            "mean_relative_error": report.mean_relative_error,
            "processes": current().world_size,
            "threads": torch.get_num_threads(),
        }
        args.timings.write_text(json.dumps(timings))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(setting: dict, args, workdir: Path, tag: str) -> dict:
    weights, timings = workdir / f"{tag}.safetensors", workdir / f"{tag}.json"
    sizes = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "vocab")]
    sizes += [f"--num-samples={args.num_samples}", f"--sequence-length={args.sequence_length}"]
    tail = [__file__, "--child", "--source", str(workdir / "model"), "--weights", str(weights), "--timings",
            str(timings), *sizes]  # fmt: skip
    if setting["processes"] > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={setting['processes']}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *tail]  # fmt: skip
    else:
        command = [sys.executable, *tail]
    env = {**os.environ, "OMP_NUM_THREADS": str(setting["threads"]), "GLOO_SOCKET_IFNAME": "lo"}
    subprocess.run(command, check=True, capture_output=True, text=True, env=env, timeout=3600)
    return {**json.loads(timings.read_text()), "weights": str(weights)}


def _difference(reference: str, other: str) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(reference), load_file(other)
    max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    disagree = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a)
    return {"max_abs_weight_difference": max_diff, "mask_disagreements": disagree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/optimum-admm-distributed-bench"))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "distributed-cpu.json")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timings", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    _llama(args).save_pretrained(args.workdir / "model")
    settings = [{"processes": 1, "threads": 1}, {"processes": 2, "threads": 1}, {"processes": 1, "threads": 2}]
    runs: dict[str, list[dict]] = {f"{s['processes']}x{s['threads']}": [] for s in settings}
    for round_index in range(args.rounds):  # interleaved: every setting sees the same machine noise
        for setting in settings:
            key = f"{setting['processes']}x{setting['threads']}"
            runs[key].append(_run(setting, args, args.workdir, f"{key}-{round_index}"))
            print(key, round_index, f"{runs[key][-1]['wall_seconds']:.1f}s", flush=True)
    reference = runs["1x1"][0]["weights"]
    summary = {}
    for key, results in runs.items():
        walls = [r["wall_seconds"] for r in results]
        summary[key] = {
            "processes": results[0]["processes"],
            "threads_per_process": results[0]["threads"],
            "wall_seconds_median": statistics.median(walls),
            "wall_seconds_min": min(walls),
            "wall_seconds_max": max(walls),
            **{
                f"{phase}_seconds_median": statistics.median(r[f"{phase}_seconds"] for r in results)
                for phase in ("forward", "statistics", "solve", "communication")
            },
            "mean_relative_error_median": statistics.median(r["mean_relative_error"] for r in results),
            **_difference(reference, results[-1]["weights"]),
        }
    import torch
    import transformers

    result = {
        "model": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "vocab": args.vocab,
        },
        "calibration": {"num_samples": args.num_samples, "sequence_length": args.sequence_length},
        "method": "admm 50% unstructured (20 iterations)",
        "rounds": args.rounds,
        "settings": summary,
        "speedup_2_processes_over_1x1": summary["1x1"]["wall_seconds_median"] / summary["2x1"]["wall_seconds_median"],
        "speedup_2_processes_over_1x2": summary["1x2"]["wall_seconds_median"] / summary["2x1"]["wall_seconds_median"],
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/distributed.py " + " ".join(sys.argv[1:]),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
