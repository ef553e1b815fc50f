"""Where a model's weights live while it is pruned: one small protocol, one implementation per place.

The block-by-block driver (:func:`optimum_admm.sequential.prune_model`) never touches a weight itself; it asks the
store of the run to

- ``load_block(i)`` / ``release_block(i)``: make block ``i``'s weights present on its execution device, and drop
  them again (the input capture runs every block once, the main loop one block at a time);
- ``module(name)``: hold a module with its own weights present, for reading and writing them (written back where
  they came from on leaving);
- ``block_tensors(i)``: the block's tensors on CPU (digested for resume, recorded in the checkpoint, written out);
- ``commit_block(i, recorded)`` / ``restore_block(i, recorded)``: the block is finished (streaming writes its
  output shard) / a resumed run takes the block as recorded;
- ``identity()``: what identifies the source beyond its blocks, for resume.

Three stores implement it:

- :class:`InMemoryStore`: every weight is a tensor in memory (on any devices);
- :class:`OffloadedStore`: a model dispatched by accelerate whose offloaded modules keep their weights in an
  ``AlignDevicesHook``'s weights map (disk offload, CPU offload, ``accelerate.cpu_offload()``); read and written
  through :func:`optimum_admm.offload.onloaded`;
- :class:`optimum_admm.streaming.CheckpointStore`: a safetensors checkpoint read one block at a time into a skeleton
  on ``meta`` and written, block by block, into a staged output directory.

:func:`store_for` picks the first two for a loaded model; everything else in the package that reads a weight of a
possibly offloaded model (saving masks, evaluation devices) goes through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .experts import expert_matrix
from .modeling import execution_device
from .offload import find_offload_hook, onloaded
from .reporting import PhaseTimer

__all__ = ["InMemoryStore", "OffloadedStore", "WeightStore", "input_device", "store_for"]

#: ``embed(batch of token ids) -> inputs_embeds``, for a capture that must not run the model's own embedding.
Embed = Callable[[torch.Tensor], torch.Tensor]


class WeightStore:
    """The protocol, with the behaviour of weights that are already in memory.

    Args:
        model: the model (its decoder blocks are found by the driver and given to :meth:`bind`).
        timer: where reads and writes are counted (``load`` and ``write`` phases); the driver's timer.

    Example:
        >>> from torch import nn
        >>> store = InMemoryStore(nn.Sequential(nn.Linear(2, 2)))
        >>> with store.module("0") as linear:
        ...     linear.weight.shape
        torch.Size([2, 2])
    """

    #: Whether every block's weights can be read before the first forward without reading the source again (true
    #: for weights in memory or in an offload map; a streamed checkpoint is checked block by block as it is read).
    resident = True

    def __init__(self, model: nn.Module, timer: PhaseTimer | None = None) -> None:
        self.model = model
        self.timer = timer or PhaseTimer()
        self.blocks_name = ""
        self.blocks: nn.ModuleList | list[nn.Module] = []

    def bind(self, blocks_name: str, blocks: nn.ModuleList) -> None:
        """Tell the store which modules are the decoder blocks (found by the driver)."""
        self.blocks_name, self.blocks = blocks_name, blocks

    def block_name(self, index: int) -> str:
        """The full module name of block ``index``."""
        return f"{self.blocks_name}.{index}" if self.blocks_name else str(index)

    def prepare_capture(self, batches: list[torch.Tensor]) -> Embed | None:
        """Make the modules before the first block usable for the input capture; an ``embed`` function or ``None``
        (the model embeds its own ``input_ids``)."""
        return None

    def end_capture(self) -> None:
        """The capture is over: modules only it needed may be dropped."""

    def load_block(self, index: int) -> None:
        """Make block ``index``'s weights present (idempotent)."""

    def release_block(self, index: int) -> None:
        """Drop block ``index``'s weights from memory where the store can read them again."""

    @contextlib.contextmanager
    def module(self, name: str, write: bool = True) -> Iterator[nn.Module]:
        """The module ``name`` with its own parameters present; changes are kept when ``write``. One expert's matrix
        of fused experts (``<experts module>.<expert>.<role>``) is held through its experts module."""
        found = expert_matrix(self.model, name)
        with self._hold(name if found is None else found[0], write) as module:
            yield module if found is None else found[1]

    @contextlib.contextmanager
    def modules(self, names: list[str], write: bool = True) -> Iterator[list[nn.Module]]:
        """Several modules at once, as :meth:`module` gives each; a module that holds several of them (the gate and
        up matrices of one fused expert) is held once."""
        with contextlib.ExitStack() as stack:
            held: dict[str, nn.Module] = {}
            modules = []
            for name in names:
                found = expert_matrix(self.model, name)
                owner = name if found is None else found[0]
                if owner not in held:
                    held[owner] = stack.enter_context(self._hold(owner, write))
                modules.append(held[owner] if found is None else found[1])
            yield modules

    @contextlib.contextmanager
    def _hold(self, name: str, write: bool) -> Iterator[nn.Module]:
        """A real submodule with its own parameters present (what :meth:`module` needs of a store)."""
        yield self.model.get_submodule(name)

    def parameter_owners(self, index: int) -> Iterator[tuple[str, nn.Module]]:
        """``(full name, module)`` of every module of block ``index`` that owns parameters itself."""
        prefix = self.block_name(index)
        for local, sub in self.blocks[index].named_modules():
            if next(sub.parameters(recurse=False), None) is not None:
                yield (f"{prefix}.{local}" if local else prefix), sub

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s parameters on CPU, by full name (a view, not a copy, of CPU tensors in memory)."""
        tensors = {}
        for owner, _ in self.parameter_owners(index):
            with self.module(owner, write=False) as sub:
                for local, param in sub.named_parameters(recurse=False):
                    tensors[f"{owner}.{local}"] = param.detach().to("cpu").contiguous()
        return tensors

    def read(self, name: str) -> torch.Tensor:
        """A parameter by full name (``"model.layers.0.mlp.up_proj.weight"``), on CPU; ``meta`` where the store
        holds no value for it now. May share memory with the model: read it, do not modify it."""
        owner, _, local = name.rpartition(".")
        with self.module(owner, write=False) as sub:
            value = getattr(sub, local).detach()
            return value if value.is_meta else value.to("cpu")

    def restore_block(self, index: int, recorded: Path) -> None:
        """Take block ``index`` as recorded in the safetensors file ``recorded`` (a resumed run)."""
        from safetensors.torch import load_file

        with self.timer.phase("load"):
            saved = load_file(str(recorded))
        for owner, _ in self.parameter_owners(index):
            with self.module(owner) as sub:
                for local, param in sub.named_parameters(recurse=False):
                    param.data.copy_(saved[f"{owner}.{local}"].to(param.device))

    def commit_block(self, index: int, recorded: Path | None) -> None:
        """Block ``index`` is pruned (its tensors are in ``recorded`` when the run keeps a checkpoint)."""

    def identity(self) -> dict[str, Any]:
        """What identifies the source beyond its blocks' digests (recorded with a checkpoint)."""
        return {}


class InMemoryStore(WeightStore):
    """Every weight is an ordinary tensor of the model, on whatever devices it was placed (``.to``, a device map
    without offload)."""


class OffloadedStore(WeightStore):
    """A model dispatched by accelerate with offloaded modules (disk, CPU or ``cpu_offload()``).

    Their parameters are ``meta`` between forwards; :meth:`module` brings them onto the execution device from the
    hook's weights map and writes changed values back into it, so later forwards see them.

    Example:
        >>> from torch import nn
        >>> store = OffloadedStore(nn.Sequential(nn.Linear(2, 2)))
        >>> store.read("0.weight").shape
        torch.Size([2, 2])
    """

    @contextlib.contextmanager
    def _hold(self, name: str, write: bool) -> Iterator[nn.Module]:
        with onloaded(self.model, name, write_back=write) as sub:
            yield sub


def _is_offloaded(model: nn.Module) -> bool:
    return any(
        find_offload_hook(model, name) is not None
        for name, module in model.named_modules()
        if getattr(module, "_hf_hook", None) is not None
    )


def store_for(model: nn.Module, timer: PhaseTimer | None = None) -> WeightStore:
    """The store for a loaded model: :class:`OffloadedStore` when accelerate offloads any module, else in memory.

    Example:
        >>> from torch import nn
        >>> type(store_for(nn.Linear(2, 2))).__name__
        'InMemoryStore'
    """
    return OffloadedStore(model, timer) if _is_offloaded(model) else InMemoryStore(model, timer)


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: the execution device of its input embedding (accelerate's hook when
    dispatched), never ``meta``. ``next(model.parameters()).device`` is ``meta`` when the first module is offloaded.

    Example:
        >>> from torch import nn
        >>> input_device(nn.Linear(2, 2)).type
        'cpu'
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = execution_device(embeddings if embeddings is not None else model)
    if device.type == "meta":
        hook = getattr(model, "_hf_hook", None)
        device = torch.device(getattr(hook, "execution_device", None) or "cpu")
    return device
