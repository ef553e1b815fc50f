"""Run by ``torchrun`` in tests/test_training.py: ``keep_sparse`` under DDP, in a fresh process.

``python ddp_worker.py OUT model`` trains the pruned model saved in ``OUT/input.pt`` (state dict and batches) for 3
steps of DDP SGD; ``python ddp_worker.py OUT toy`` trains a masked toy MLP on per-rank data. Every rank saves its
final state in ``OUT/rank<R>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_tiny_model  # noqa: E402

from optimum_admm.training import apply_masks_, keep_sparse  # noqa: E402


def train_model(out: Path) -> dict:
    saved = torch.load(out / "input.pt")
    model = build_tiny_model("llama")
    model.load_state_dict(saved["state"])
    ddp = nn.parallel.DistributedDataParallel(model.train())
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    with keep_sparse(ddp, optimizer=optimizer) as guard:  # names carry DDP's "module." prefix
        pruned = guard.num_pruned
        for batch in saved["batches"]:
            ddp(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return {"state": model.state_dict(), "num_pruned": pruned}


def train_toy(rank: int) -> dict:
    torch.manual_seed(0)  # identical initial weights and masks on both ranks
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = {"0.weight": torch.rand(16, 8) > 0.7, "2.weight": torch.rand(4, 16) > 0.5}
    apply_masks_(model, masks)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=0.05, weight_decay=0.1)
    torch.manual_seed(1 + rank)  # different data on each rank
    with keep_sparse(ddp, optimizer=optimizer) as guard:
        for _ in range(3):
            ddp(torch.randn(5, 8)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        violations = guard.num_violations()
    return {"state": model.state_dict(), "masks": masks, "violations": violations}


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        result = train_model(out) if mode == "model" else train_toy(dist.get_rank())
        torch.save(result, out / f"rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
