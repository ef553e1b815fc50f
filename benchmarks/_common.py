"""What the benchmarks share: the inputs both sides of a comparison read (calibration windows per seed, evaluation
tokens per domain), one plain perplexity loop, the machine's GEMM rate, and the environment block of a results file.

Only the standard library and torch are imported at module level: ``peers.py`` runs this under llm-compressor's own
interpreter too (imported as a sibling file, ``benchmarks/`` is the script's directory).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

CACHE = Path.home() / ".cache" / "optimum-admm"
RESULTS = Path(__file__).resolve().parent / "results"


def plain_perplexity(model, ids: list[int], length: int, bos: int | None) -> float:
    """Non-overlapping windows of ``length`` tokens (``bos`` first when given), a plain forward, exp(mean token NLL)."""
    import torch

    nll, count = 0.0, 0
    content = length - (1 if bos is not None else 0)
    device = next(model.parameters()).device
    for start in range(0, len(ids), content):
        window = ([bos] if bos is not None else []) + ids[start : start + content]
        if len(window) < 2:
            continue
        input_ids = torch.tensor([window], device=device)
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=input_ids).loss
        nll += float(loss) * (len(window) - 1)
        count += len(window) - 1
    return math.exp(nll / count)


def evaluate(model, work: Path, length: int) -> dict[str, float]:
    """Perplexity on every domain's evaluation tokens written by :func:`prepare`, and their mean."""
    evaluation = json.loads((work / "eval.json").read_text())
    result = {d: plain_perplexity(model, ids, length, evaluation["bos"]) for d, ids in evaluation["ids"].items()}
    result["mean"] = sum(result.values()) / len(evaluation["ids"])
    return result


def gemm_rate(rows: int = 1536, inner: int = 576, seconds: float = 1.0, device: str = "cpu") -> float:
    """FLOP/s of a plain fp32 ``torch.mm`` of ADMM's product shape, (rows x inner) @ (inner x inner), here and now."""
    import torch

    a = torch.randn(rows, inner, device=device)
    b = torch.randn(inner, inner, device=device)
    torch.mm(a, b)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    sync()
    return count * 2 * rows * inner * inner / (time.perf_counter() - start)


def admm_flops(model, iterations: int) -> float:
    """ADMM's floating-point work over the decoder blocks' linears: (iterations + 1) products (out x in)(in x in) per
    layer (A^-1 B, then one per iteration) and, per distinct input (q/k/v share one, gate/up one: they are solved
    together), the Cholesky factorisation (in^3 / 3) and the inverse from it (LAPACK potri: 2 in^3 / 3)."""
    import torch

    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    total, inputs = 0.0, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            out, inp = module.weight.shape
            total += (iterations + 1) * 2 * out * inp * inp
            prefix, _, leaf = name.rpartition(".")
            inputs[(prefix.rpartition(".")[0], shared.get(leaf, leaf))] = inp
    return total + sum((1 / 3 + 2 / 3) * inp**3 for inp in inputs.values())


def prepare(model: str, work: Path, seeds: int, num_samples: int, sequence_length: int, eval_tokens: int) -> str:
    """Write the inputs of a comparison under ``work`` (once per setting): ``calibration-seed<k>.pt`` windows drawn
    from the corpus training split (all domains) and ``eval.json``, the first ``eval_tokens`` tokens of every
    domain's test split (``bos`` for Gemma, which needs it on every window). Returns the model checkpoint's path."""
    import torch
    from transformers import AutoTokenizer

    from optimum_admm import zoo
    from optimum_admm.corpus import DOMAINS, load_corpus

    model_path = str(zoo.materialize(model))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    work.mkdir(parents=True, exist_ok=True)
    train = tokenizer("\n\n".join(load_corpus("train")["text"]), return_tensors="pt")["input_ids"][0]
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(train) - sequence_length, (num_samples,), generator=generator)
        windows = torch.stack([train[s : s + sequence_length] for s in starts.tolist()])
        torch.save(windows, work / f"calibration-seed{seed}.pt")
    ids = {
        d: tokenizer("\n\n".join(load_corpus("test", domains=[d])["text"]))["input_ids"][:eval_tokens] for d in DOMAINS
    }
    bos = tokenizer.bos_token_id if "gemma" in model else None
    (work / "eval.json").write_text(json.dumps({"ids": ids, "bos": bos}))
    return model_path


def environment(threads: int, jobs: int = 1, device: str = "cpu") -> dict:
    """Hardware and versions, for the header of a results file."""
    import importlib.metadata as metadata

    versions = {}
    for name in ("optimum-admm", "torch", "transformers", "accelerate"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    info = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {threads} thread(s) per run, {jobs} run(s) at a time",
        "processor": platform.processor() or "unknown",
        "python": platform.python_version(),
        "versions": versions,
        "load_average": os.getloadavg()[0],
    }
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and spread (max - min)."""
    return sum(values) / len(values), max(values) - min(values)


def run_worker(python: str | Path, script: str | Path, spec: dict, spec_path: Path) -> dict:
    """Run one benchmark measurement as a fresh subprocess: ``python script --worker spec_path`` with
    ``spec["threads"]`` threads. The worker prints one ``RESULT <json>`` line on stdout; a worker that also prints
    ``PEAK_RSS_KIB <n>`` on stderr (at exit) gets ``peak_rss_gib`` from it. Returns the spec merged with the result,
    or with ``error`` (the last line of stderr) when the worker failed."""
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.run(
        [str(python), str(script), "--worker", str(spec_path)], capture_output=True, text=True, env=env
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    messages = [line for line in process.stderr.strip().splitlines() if not line.startswith("PEAK_RSS_KIB ")]
    if process.returncode != 0 or not lines:
        return {**spec, "error": messages[-1] if messages else f"exit {process.returncode}"}
    result = {**spec, **json.loads(lines[-1][len("RESULT ") :])}
    for line in process.stderr.splitlines():
        if line.startswith("PEAK_RSS_KIB "):
            result["peak_rss_gib"] = int(line.split()[1]) / 2**20
    return result
