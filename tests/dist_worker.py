"""Run by ``torchrun`` in tests/test_distributed.py: prune tiny models on every rank, rank 0 saves the results.

``python dist_worker.py OUT MODE [options]``; MODE is ``memory`` (every method of METHODS on a fresh tiny model),
``streaming`` (one prune of a saved checkpoint) or ``resume`` (memory mode with a checkpoint, waiting after the
first recorded block so that the test can kill a rank).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_tiny_model  # noqa: E402

from optimum_admm import ADMMConfig, ADMMPruner, SparseGPTConfig, WandaConfig  # noqa: E402
from optimum_admm.distributed import current, init_from_environment  # noqa: E402

FAST = {"num_samples": 6, "sequence_length": 32, "seed": 1}
METHODS = {
    "admm": ADMMConfig(**FAST),
    "sparsegpt": SparseGPTConfig(**FAST),
    "wanda": WandaConfig(**FAST),
    "admm-2:4": ADMMConfig(**FAST, mask_structure="2:4"),
}


def calibration(vocab: int) -> torch.Tensor:
    return torch.randint(
        0, vocab, (FAST["num_samples"], FAST["sequence_length"]), generator=torch.Generator().manual_seed(3)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("mode", choices=["memory", "offload", "streaming", "resume", "fail"])
    parser.add_argument("--family", default="llama")
    parser.add_argument("--source", type=Path)
    parser.add_argument("--checkpoint-dir", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    assert init_from_environment()
    group = current()
    (args.out / f"pid-{group.rank}").write_text(str(os.getpid()))
    if args.mode == "streaming":
        from optimum_admm.streaming import prune_checkpoint

        ids = calibration(build_tiny_model(args.family).config.vocab_size)
        prune_checkpoint(args.source, args.out / "streamed", METHODS["admm"], ids, show_progress=False)
        return
    if args.mode in ("resume", "fail"):
        import optimum_admm.resume as resume
        import optimum_admm.sequential as sequential

        if args.mode == "resume" and not (args.checkpoint_dir / "state.json").exists():
            real = resume.save_block

            def save_then_wait(*a, **k):
                real(*a, **k)
                time.sleep(120)  # the test kills a rank now

            resume.save_block = save_then_wait
        if args.mode == "fail" and group.rank == 1:
            real_prune = sequential._prune_block

            def failing(run, index, inputs):
                if index == 1:
                    raise RuntimeError("injected failure on rank 1 at block 1")
                return real_prune(run, index, inputs)

            sequential._prune_block = failing
    methods = list(METHODS) if args.mode == "memory" else ["admm"]
    for name in methods:
        model = build_tiny_model(args.family)
        if args.mode == "offload":  # block 1 on disk, in this rank's own offload folder
            from accelerate import dispatch_model
            from test_offload import _device_map

            folder = args.out / f"offload-{group.rank}"
            model = dispatch_model(model, _device_map(model, offloaded={1}), offload_dir=str(folder))
        pruner = ADMMPruner.from_pretrained(model, config=METHODS[name])
        pruner.prune(calibration(model.config.vocab_size), show_progress=False, checkpoint_dir=args.checkpoint_dir)
        if group.is_main:
            from optimum_admm.stores import store_for

            store = store_for(model)  # offloaded weights are read from the weights map
            torch.save({k: store.read(k).clone() for k, _ in model.named_parameters()}, args.out / f"{name}.pt")


if __name__ == "__main__":
    main()
