"""Where our SparseGPT and llm-compressor's part ways: the same model, calibration windows and evaluation tokens as
``peers.py``, run under llm-compressor's interpreter (its transformers) in four ways:

- ``ours``: our driver and our column sweep;
- ``ours+their-sweep``: our driver (our Hessians) with llm-compressor's ``sparsify_weight`` for every layer;
- ``theirs``: llm-compressor's ``oneshot``;
- ``theirs+our-sweep``: llm-compressor's pipeline (its Hessians) with our ``sparsegpt_prune`` for every layer;
- ``ours-nudged``: ``ours`` with the dampening multiplied by ``1 + nudge`` for every ``--nudges`` value: how far
  perturbations far below any setting a user would tune move the result (the method's own noise floor).

Each run also saves the Hessian and dense weight of every layer of the first ``--keep-blocks`` blocks, and the script
compares the two sides' Hessians (relative Frobenius difference after scaling to the same trace) and the masks the
two sweeps choose from one Hessian.

    python benchmarks/sparsegpt_diff.py --model gemma3-270m --pattern 2:4 --seed 1

Writes ``benchmarks/results/sparsegpt-diff-<model>-<pattern>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common  # noqa: E402
from _common import CACHE  # noqa: E402

MODES = ["ours", "ours+their-sweep", "theirs", "theirs+our-sweep", "ours-nudged"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--keep-blocks", type=int, default=2)
    parser.add_argument("--nudges", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=768)
    parser.add_argument("--eval-length", type=int, default=256)
    parser.add_argument("--tag", default="", help="suffix of the results file")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _nm(pattern: str) -> tuple[float, tuple[int, int] | None]:
    if ":" in pattern:
        n, m = (int(x) for x in pattern.split(":"))
        return 1 - n / m, (n, m)
    return float(pattern), None


def _block_of(name: str) -> int | None:
    return int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None


def _their_sweep(weight, gram, sparsity: float, nm: tuple[int, int] | None):
    """llm-compressor's ``sparsify_weight`` on one weight and Hessian (block 128, dampening 0.01), in fp32."""
    import torch
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight.detach().to(torch.float32).clone()
    n, m = nm if nm is not None else (0, 0)
    # llm-compressor's prune_n counts the zeros of a group (m - n of ours); 0 means unstructured
    _, pruned = sparsify_weight(layer, {layer: gram.clone()}, sparsity, m - n if m else 0, m, 128, 0.01, False)
    return pruned.detach()


def worker(spec_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(HERE.parent))  # optimum_admm, also under llm-compressor's interpreter
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32).eval()
    calibration = torch.load(work / f"calibration-seed{spec['seed']}.pt")
    sparsity, nm = _nm(spec["pattern"])
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    by_weight = {m.weight.data_ptr(): n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    keep = spec["keep_blocks"]

    def save(name: str, hessian: torch.Tensor, weight: torch.Tensor) -> None:
        block = _block_of(name)
        if block is not None and block < keep:
            saved[name] = {"hessian": hessian.detach().clone(), "weight": weight.detach().clone()}

    mode = spec["mode"]
    start = time.perf_counter()
    if mode.startswith("ours"):
        from optimum_admm import ADMMPruner, SparseGPTConfig, registry
        from optimum_admm.algorithms import sparsegpt_prune_group

        original = registry.sparsegpt_prune_group
        their_sweep = None
        if mode == "ours+their-sweep":

            def their_sweep(weight, gram, layer_sparsity):
                return _their_sweep(weight, gram, layer_sparsity, nm).to(weight.dtype)

        def patched(weights, gram, sparsities, **kwargs):
            for w in weights:
                name = by_weight.pop(w.data_ptr(), None)  # popped: a freed address may be reused
                if name is not None:
                    save(name, gram, w)
            if their_sweep is None:
                return original(weights, gram, sparsities, **kwargs)
            return [their_sweep(w, gram, s) for w, s in zip(weights, sparsities, strict=True)]

        registry.sparsegpt_prune_group = patched
        structure = spec["pattern"] if nm is not None else "unstructured"
        config = SparseGPTConfig(sparsity=sparsity, mask_structure=structure, num_samples=len(calibration),
                                 sequence_length=calibration.shape[1], seed=spec["seed"],
                                 dampening=0.01 * (1 + spec.get("nudge", 0.0)))  # fmt: skip
        ADMMPruner(model=model, config=config).prune(calibration, show_progress=False)
        del sparsegpt_prune_group
    else:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier
        from llmcompressor.modifiers.pruning.sparsegpt import base

        from optimum_admm.algorithms import sparsegpt_prune

        original = base.sparsify_weight

        def patched(module, hessians_dict, sparsity, prune_n, prune_m, block_size, dampening_frac, **kwargs):
            name = names.get(id(module))
            if name is not None:
                save(name, hessians_dict[module], module.weight)
            if mode == "theirs":
                return original(module=module, hessians_dict=hessians_dict, sparsity=sparsity, prune_n=prune_n,
                                prune_m=prune_m, block_size=block_size, dampening_frac=dampening_frac, **kwargs)  # fmt: skip
            gram = hessians_dict.pop(module)
            pruned = sparsegpt_prune(module.weight.detach(), gram, sparsity, nm=nm, block_size=block_size,
                                     dampening=dampening_frac)  # fmt: skip
            return torch.zeros(()), pruned

        base.sparsify_weight = patched
        structure = spec["pattern"] if nm is not None else "0:0"
        modifier = SparseGPTModifier(sparsity=sparsity, mask_structure=structure, targets=[r"re:model.layers.\d*$"],
                                     ignore=["re:.*lm_head"])  # fmt: skip
        dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                     "attention_mask": torch.ones_like(calibration).tolist()})  # fmt: skip
        oneshot(model=model, dataset=dataset, recipe=[modifier], num_calibration_samples=len(calibration),
                max_seq_length=calibration.shape[1])  # fmt: skip
    wall = time.perf_counter() - start
    perplexity = _common.evaluate(model, work, spec["eval_length"])
    torch.save(saved, Path(spec["saved"]))
    print("RESULT " + json.dumps({"wall": wall, "perplexity": perplexity, "saved_layers": len(saved)}))


def compare_layers(path_a: Path, path_b: Path, nm: tuple[int, int] | None, sparsity: float) -> list[dict]:
    """Per saved layer: the relative difference of the two sides' Hessians (each scaled to unit trace) and of their
    dense weights, and the share of mask entries on which the two sweeps disagree when both get side A's Hessian."""
    import torch

    from optimum_admm.algorithms import sparsegpt_prune

    a, b = torch.load(path_a), torch.load(path_b)
    rows = []
    try:
        import llmcompressor  # noqa: F401  (their sweep only under their interpreter)

        compare_sweeps = True
    except ImportError:
        compare_sweeps = False
    for name in sorted(set(a) & set(b), key=lambda n: (_block_of(n), n)):
        ha, hb = a[name]["hessian"].double(), b[name]["hessian"].double()
        ha, hb = ha / ha.trace(), hb / hb.trace()
        row = {
            "layer": name,
            "hessian_rel_diff": float((ha - hb).norm() / ha.norm()),
            "weight_rel_diff": float((a[name]["weight"] - b[name]["weight"]).norm() / a[name]["weight"].norm()),
        }
        if compare_sweeps:
            w, h = a[name]["weight"].detach().float(), a[name]["hessian"].float()
            ours = sparsegpt_prune(w, h, sparsity, nm=nm)
            theirs = _their_sweep(w, h, sparsity, nm)
            row["mask_disagreement"] = float(((ours == 0) != (theirs == 0)).float().mean())
            row["weight_diff_same_hessian"] = float((ours - theirs).norm() / theirs.norm())
        rows.append(row)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return
    import peers

    python = peers.ensure_venv("0.14.0.1")
    # our driver under their interpreter needs optimum (the OptimumQuantizer base class); no dependencies, so
    # nothing of theirs changes
    from importlib import metadata

    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"optimum=={metadata.version('optimum')}"],
                   check=True)  # fmt: skip
    work = CACHE / "peers" / args.model
    model_path = _common.prepare(args.model, work, max(args.seeds) + 1, args.num_samples, args.sequence_length,
                                 args.eval_tokens)  # fmt: skip
    rows = []
    for seed in args.seeds:
        runs = [(mode, 0.0) for mode in args.modes if mode != "ours-nudged"]
        runs += [("ours-nudged", nudge) for nudge in args.nudges if "ours-nudged" in args.modes]
        for mode, nudge in runs:
            saved = work / f"diff-{args.pattern.replace(':', '-')}-{seed}-{mode}.pt"
            spec = {"mode": mode, "pattern": args.pattern, "seed": seed, "model_path": model_path, "work": str(work),
                    "threads": args.threads, "eval_length": args.eval_length, "keep_blocks": args.keep_blocks,
                    "saved": str(saved), "nudge": nudge}  # fmt: skip
            row = _common.run_worker(python, __file__, spec, work / f"diff-spec-{mode}-{seed}.json")
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("mode", "nudge", "seed", "wall", "error")}
                             | {"ppl": row.get("perplexity", {}).get("mean")}), flush=True)  # fmt: skip
    out = HERE / "results" / f"sparsegpt-diff-{args.model}-{args.pattern.replace(':', '-')}{args.tag}.json"
    out.write_text(json.dumps({"environment": _common.environment(args.threads), "rows": rows}, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
