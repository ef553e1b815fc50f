"""Device-map mode against the CPU result: prune a model spread by an accelerate device map, compare with CPU.

Builds a random LLaMA checkpoint (safetensors), prunes it once loaded on the CPU (the reference) and once loaded with
a device map over ``--devices`` (every CUDA device by default, then the CPU, and with ``--disk`` one block offloaded
to disk), with the same config and calibration tokens, and reports how far the pruned weights are apart: the
largest absolute difference, the share of weights within fp32 tolerance (``torch.isclose``, rtol 1e-4, atol 1e-6
relative to the layer's largest weight), the share of identical mask entries, the layer errors and the logits on
held-out tokens. On a CPU-only machine ``--devices cpu --disk`` checks the same path with a CPU + disk map (then the
result is bitwise identical, as the tests assert).

    python benchmarks/device_map.py                        # a GPU machine: every GPU + CPU
    python benchmarks/device_map.py --devices cpu --disk   # no GPU: CPU + disk

Results: ``benchmarks/results/device-map-<devices>.json`` with the hardware and versions.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger("benchmark")


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(256, args.sequence_length),
        tie_word_embeddings=False,
    )


def _device_map(num_layers: int, devices: list[str], disk: bool) -> dict[str, str | int]:
    """Blocks split into contiguous runs over ``devices`` (the last block on disk with ``disk``); the embedding on
    the first device, the final norm and head on the last, as accelerate's ``"auto"`` map would place them."""
    placed: list[str | int] = [int(d.split(":")[1]) if d.startswith("cuda:") else d for d in devices]
    mapping: dict[str, str | int] = {"model.embed_tokens": placed[0], "model.rotary_emb": placed[0]}
    on_disk = {num_layers - 1} if disk else set()
    spread = [i for i in range(num_layers) if i not in on_disk]
    for rank, index in enumerate(spread):
        mapping[f"model.layers.{index}"] = placed[rank * len(placed) // max(1, len(spread))]
    for index in on_disk:
        mapping[f"model.layers.{index}"] = "disk"
    mapping["model.norm"] = placed[-1]
    mapping["lm_head"] = placed[-1]
    return mapping


def _pruned_weights(model) -> dict[str, torch.Tensor]:
    from optimum_admm.modeling import find_decoder_blocks
    from optimum_admm.offload import onloaded

    blocks_name, blocks = find_decoder_blocks(model)
    out = {}
    for i, block in enumerate(blocks):
        for local, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                name = f"{blocks_name}.{i}.{local}"
                with onloaded(model, name, write_back=False) as loaded:
                    out[name] = loaded.weight.detach().to("cpu", torch.float32, copy=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", help="default: every CUDA device, then cpu")
    parser.add_argument("--disk", action="store_true", help="offload the last block to disk")
    parser.add_argument("--method", choices=["admm", "sparsegpt", "wanda"], default="admm")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from transformers import AutoModelForCausalLM

    from optimum_admm import ADMMConfig, ADMMPruner, SparseGPTConfig, WandaConfig

    devices = args.devices or [f"cuda:{i}" for i in range(torch.cuda.device_count())] + ["cpu"]
    config_cls = {"admm": ADMMConfig, "sparsegpt": SparseGPTConfig, "wanda": WandaConfig}[args.method]
    config = config_cls(sparsity=0.5, num_samples=args.num_samples, sequence_length=args.sequence_length)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.num_samples, args.sequence_length), generator=generator)
    held_out = torch.randint(0, args.vocab, (2, args.sequence_length), generator=generator)

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model"
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(_config(args)).save_pretrained(source)

        runs = {}
        for label, device_map in (
            ("cpu", None),
            ("device_map", _device_map(args.layers, devices, args.disk)),
        ):
            kwargs = {"dtype": torch.float32}
            if device_map is not None:
                kwargs.update(device_map=device_map, offload_folder=str(Path(tmp) / "offload"))
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            pruner = ADMMPruner.from_pretrained(model, config=config)
            start = time.perf_counter()
            report = pruner.prune(calibration_dataset=ids, show_progress=False)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                first = model.get_input_embeddings().weight.device
                device = first if first.type != "meta" else torch.device("cpu")
                logits = model(input_ids=held_out.to(device)).logits.float().cpu()
            runs[label] = {
                "device_map": device_map,
                "weights": _pruned_weights(model),
                "errors": [row.relative_error for row in report.layers],
                "logits": logits,
                "seconds": seconds,
            }
            logger.info("%s: pruned in %.1fs", label, seconds)
            del model, pruner

    reference, mapped = runs["cpu"], runs["device_map"]
    max_abs, close, total, masks_equal = 0.0, 0, 0, 0
    for name, expected in reference["weights"].items():
        got = mapped["weights"][name]
        scale = float(expected.abs().max())
        max_abs = max(max_abs, float((got - expected).abs().max()))
        close += int(torch.isclose(got, expected, rtol=1e-4, atol=1e-6 * scale).sum())
        masks_equal += int(((got != 0) == (expected != 0)).sum())
        total += expected.numel()
    error_gap = max(abs(a - b) for a, b in zip(reference["errors"], mapped["errors"], strict=True))
    import accelerate
    import transformers

    results = {
        "model": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers},
        "config": config.to_dict(),
        "calibration": {"num_samples": args.num_samples, "sequence_length": args.sequence_length},
        "devices": devices,
        "disk": args.disk,
        "device_map": {k: str(v) for k, v in mapped["device_map"].items()},
        "max_abs_weight_difference": max_abs,
        "share_of_weights_within_fp32_tolerance": close / total,
        "share_of_identical_mask_entries": masks_equal / total,
        "bitwise_identical": max_abs == 0.0,
        "max_layer_error_difference": error_gap,
        "max_abs_logit_difference": float((reference["logits"] - mapped["logits"]).abs().max()),
        "seconds": {"cpu": reference["seconds"], "device_map": mapped["seconds"]},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "python": platform.python_version(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    name = "-".join(d.replace(":", "") for d in devices) + ("-disk" if args.disk else "")
    output = args.output or Path(__file__).parent / "results" / f"device-map-{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    logger.info(json.dumps({k: v for k, v in results.items() if k not in ("config", "device_map")}, indent=2))


if __name__ == "__main__":
    main()
