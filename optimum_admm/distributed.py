"""Pruning with several processes on ``torch.distributed`` (``torchrun`` / ``accelerate launch``).

When a process group is initialised (the command line initialises one when ``torchrun`` sets ``WORLD_SIZE > 1``),
the one block driver (:func:`optimum_admm.sequential.prune_model`) splits its work:

- calibration samples are sharded: sample ``i`` is calibrated on rank ``i % world_size``; every rank runs the current
  block on its own samples, and the statistics the method declared (Grams, input norms, counts) are summed over the
  ranks in fp32 (``all_reduce``), so every rank holds the statistics of all samples;
- the layers of each block are assigned to ranks by a deterministic cost-balanced rule (:func:`assign_layers`: the
  most expensive first, each to the least loaded rank, ties by name and rank), solved there, and their pruned
  weights broadcast, so every rank holds the same pruned block before propagating its samples;
- only rank 0 writes: the output, the checkpoint and its block inputs (gathered in sample order, so a resume works
  with any number of ranks);
- collectives time out (``OPTIMUM_ADMM_DIST_TIMEOUT`` seconds, default 600) instead of hanging, and ``torchrun``
  stops every rank when one fails.

The only difference from one process is the order in which the statistics are summed: the weights agree within fp32
tolerance (``tests/test_distributed.py``).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Distributed", "assign_layers", "current", "init_from_environment"]

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "OPTIMUM_ADMM_DIST_TIMEOUT"


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))


def init_from_environment() -> bool:
    """Initialise the default process group from a launcher's environment (``torchrun`` sets ``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``...) when there is more than one process and none is initialised yet: gloo on CPU, nccl
    when CUDA is available. Returns whether a group of several processes is in use.

    Example:
        >>> init_from_environment()  # one process: nothing to do
        False
    """
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=_timeout())
    logger.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


@dataclass(frozen=True)
class Distributed:
    """The process group a prune runs in (one process: rank 0 of 1, every collective a no-op).

    Example:
        >>> Distributed(0, 1).shard(list(range(5)))
        [0, 1, 2, 3, 4]
        >>> Distributed(1, 2).shard(list(range(5)))
        [1, 3]
    """

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share: items ``rank, rank + world_size, ...``."""
        return items[self.rank :: self.world_size]

    def device(self, tensor: torch.Tensor) -> torch.device:
        """Where a collective on ``tensor`` runs: gloo works on CPU tensors, nccl on CUDA ones."""
        import torch.distributed as dist

        return torch.device("cpu") if dist.get_backend() == "gloo" else tensor.device

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place (fp32 stays fp32)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        on = tensor.to(self.device(tensor))
        dist.all_reduce(on)
        if on is not tensor:
            tensor.copy_(on)

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        """Give every rank ``src``'s ``tensor``, in place."""
        if not self.enabled:
            return
        import torch.distributed as dist

        on = tensor.to(self.device(tensor)).contiguous()
        dist.broadcast(on, src=src)
        if on is not tensor:
            tensor.copy_(on)

    def broadcast_object(self, value: Any, src: int) -> Any:
        """``src``'s ``value`` on every rank (a small picklable object: a report row, a state)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_samples(self, local: list[torch.Tensor], total: int) -> list[torch.Tensor] | None:
        """Every rank's share of ``total`` samples, back in sample order, on rank 0 (``None`` elsewhere)."""
        if not self.enabled:
            return local
        import torch.distributed as dist

        shares: list[list[torch.Tensor] | None] = [None] * self.world_size if self.is_main else None
        dist.gather_object([t.cpu() for t in local], shares, dst=0)
        if not self.is_main:
            return None
        return [shares[i % self.world_size][i // self.world_size] for i in range(total)]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def current() -> Distributed:
    """The default process group when one is initialised, else one process.

    Example:
        >>> current().world_size
        1
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size())
    return Distributed()


def assign_layers(costs: dict[str, float], world_size: int) -> dict[str, int]:
    """Which rank solves which layer: the most expensive first, each to the least loaded rank (ties: the name, then
    the lowest rank), so every rank computes the same assignment without communicating.

    Example:
        >>> assign_layers({"q": 4.0, "k": 1.0, "v": 1.0, "o": 4.0}, 2)
        {'o': 0, 'q': 1, 'k': 0, 'v': 1}
    """
    loads = [0.0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += costs[name]
    return owners
