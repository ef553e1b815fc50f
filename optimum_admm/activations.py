"""Where the calibration activations wait between blocks: a device (CPU by default) or files on disk.

With ``activation_cache_dir`` every block input is a tensor memory-mapped from its own file in that directory
(``torch.from_file(..., shared=True)``). The file is unlinked as soon as it is mapped, so nothing is left behind by
a finished, failed or killed run, and its disk space is returned when the driver drops the tensor (when the next
block's inputs replace it). The kernel writes the pages back to disk and drops them under memory pressure, so the
activations need disk space, not RAM; each forward reads one calibration batch back.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import InvalidArgumentError, OutputDirectoryError
from .memory import ActivationMemory, activation_bytes, check_activation_budget, format_bytes, hidden_size_of

__all__ = ["DiskActivations", "Storage", "check_activation_storage", "check_disk_space", "resolve_storage", "stash"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskActivations:
    """Keep activations in memory-mapped, already-unlinked files under ``directory``.

    Example:
        >>> import tempfile
        >>> store = DiskActivations(Path(tempfile.mkdtemp()))
        >>> stored = store.store(torch.ones(2, 3))
        >>> stored.sum().item(), list(store.directory.iterdir())
        (6.0, [])
    """

    directory: Path

    def store(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU copy of ``tensor`` backed by a file in :attr:`directory` (unlinked at once)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=self.directory, prefix="activations-", suffix=".bin")
        os.close(handle)
        try:
            stored = torch.from_file(name, shared=True, size=tensor.numel(), dtype=tensor.dtype)
        finally:
            os.unlink(name)
        stored = stored.view(tensor.shape)
        stored.copy_(tensor.detach())
        return stored


Storage = torch.device | DiskActivations


def resolve_storage(storage_device: torch.device | str, activation_cache_dir: str | os.PathLike | None) -> Storage:
    """``DiskActivations(activation_cache_dir)`` when a directory is given, else ``torch.device(storage_device)``.

    Example:
        >>> resolve_storage("cpu", None)
        device(type='cpu')
        >>> resolve_storage("cpu", "cache")
        DiskActivations(directory=PosixPath('cache'))
    """
    if activation_cache_dir is None:
        return torch.device(storage_device)
    if not isinstance(activation_cache_dir, (str, os.PathLike)) or not str(activation_cache_dir):
        raise InvalidArgumentError(
            f"activation_cache_dir={activation_cache_dir!r} is invalid; allowed: a directory path"
        )
    directory = Path(activation_cache_dir)
    if directory.exists() and not directory.is_dir():
        raise InvalidArgumentError(
            f"activation_cache_dir={str(activation_cache_dir)!r} is invalid; it exists and is a file"
        )
    return DiskActivations(directory)


def stash(tensor: torch.Tensor, storage: Storage) -> torch.Tensor:
    """Move a block input or output to where activations wait: a device, or a file on disk."""
    if isinstance(storage, DiskActivations):
        return storage.store(tensor)
    return tensor.detach().to(storage)


def check_disk_space(storage: DiskActivations, needed: int) -> None:
    """Refuse, with the numbers, a cache directory whose file system cannot hold ``needed`` bytes.

    Example:
        >>> import tempfile
        >>> check_disk_space(DiskActivations(Path(tempfile.mkdtemp())), 1024)
    """
    probe = storage.directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    logger.info("calibration activations: %s on disk in %s (%s free)", format_bytes(needed), probe, format_bytes(free))
    if needed > free:
        raise OutputDirectoryError(
            f"activation_cache_dir={str(storage.directory)!r} has {format_bytes(free)} free, but the calibration "
            f"activations need {format_bytes(needed)}; free some space, choose another directory or lower "
            "num_samples or sequence_length"
        )


def check_activation_storage(
    model: nn.Module,
    num_samples: int,
    sequence_length: int,
    activation_memory: ActivationMemory | None,
    storage: Storage,
) -> int:
    """State the activation memory before any work and refuse what cannot hold it: ``activation_memory`` for a device,
    the free space of the file system for a cache directory. Returns the expected bytes."""
    if isinstance(storage, DiskActivations):
        hidden, dtype = hidden_size_of(model)
        needed = activation_bytes(num_samples, sequence_length, hidden, dtype)
        check_disk_space(storage, needed)
        return needed
    return check_activation_budget(model, num_samples, sequence_length, activation_memory, storage)
