"""Pruning models spread by an accelerate device map: find offloaded weights, bring them in, write them back.

A model dispatched by accelerate (``dispatch_model`` or ``from_pretrained(device_map=...)``) keeps the parameters of
offloaded modules on the ``meta`` device; an ``AlignDevicesHook`` loads them from its ``weights_map`` (an
``OffloadedWeightsLoader``: a CPU state dict, memory-mapped ``.dat`` files, or safetensors shards) at every forward
and drops them afterwards. A weight changed in place would be lost at the next forward, so the pruned weight is
written back into the weights map: in place for CPU-offloaded tensors, through ``accelerate.utils.offload_weight``
for disk-offloaded ones. Nothing here moves tensors itself beyond accelerate's ``set_module_tensor_to_device``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["find_offload_hook", "onloaded", "write_offloaded_tensor"]

logger = logging.getLogger(__name__)


def _align_hook(module: nn.Module) -> Any:
    """The ``AlignDevicesHook`` attached to ``module`` (also inside a ``SequentialHook``), or ``None``."""
    from accelerate.hooks import AlignDevicesHook

    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", (hook,)):
        if isinstance(candidate, AlignDevicesHook):
            return candidate
    return None


def find_offload_hook(model: nn.Module, module_name: str) -> tuple[Any, str] | None:
    """The hook that holds the offloaded weights of ``model.get_submodule(module_name)``, and their key prefix.

    The hook may sit on the module itself or on any ancestor (accelerate puts it on the device-map entry, usually the
    decoder block). Returns ``None`` when the module's weights are not offloaded (in memory on some device).

    Example:
        >>> from torch import nn
        >>> find_offload_hook(nn.Sequential(nn.Linear(2, 2)), "0") is None
        True
    """
    parts = module_name.split(".") if module_name else []
    for depth in range(len(parts), -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        hook = _align_hook(owner)
        if hook is not None and hook.offload and hook.weights_map is not None:
            relative = ".".join(parts[depth:])
            return hook, f"{relative}." if relative else ""
    return None


def _loader_and_key(weights_map: Mapping, key: str) -> tuple[Mapping, str]:
    """Unwrap accelerate's ``PrefixedDataset`` layers down to the ``OffloadedWeightsLoader`` and its full key."""
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):
        key = f"{weights_map.prefix}{key}"
        weights_map = weights_map.dataset
    return weights_map, key


def write_offloaded_tensor(weights_map: Mapping, key: str, value: torch.Tensor) -> None:
    """Store ``value`` under ``key`` in an accelerate weights map so that later forwards load it.

    CPU-offloaded entries (the loader's ``state_dict``, or the plain dict of ``accelerate.cpu_offload()``) are
    overwritten in place; disk-offloaded entries are rewritten
    with ``accelerate.utils.offload_weight`` into the offload folder. Entries read from a model's own safetensors
    shards are never written to (that would change the source checkpoint): the new value goes to the offload folder
    when there is one, else it is kept in CPU memory with a warning.

    Example:
        >>> from accelerate.utils import OffloadedWeightsLoader
        >>> loader = OffloadedWeightsLoader(state_dict={"w": torch.ones(2)})
        >>> write_offloaded_tensor(loader, "w", torch.zeros(2))
        >>> loader["w"].tolist()
        [0.0, 0.0]
    """
    from accelerate.utils import offload_weight

    loader, full_key = _loader_and_key(weights_map, key)
    value = value.detach()
    # ``accelerate.cpu_offload()`` keeps a plain dict of CPU tensors; dispatched models an OffloadedWeightsLoader.
    state_dict = loader if isinstance(loader, dict) else getattr(loader, "state_dict", None)
    index = getattr(loader, "index", None)
    if isinstance(state_dict, dict) and full_key in state_dict:
        stored = state_dict[full_key]
        if stored.shape == value.shape and stored.dtype == value.dtype and stored.device.type != "meta":
            stored.copy_(value)
        else:
            state_dict[full_key] = value.to("cpu", copy=True)
        return
    if isinstance(index, dict) and full_key in index:
        folder = getattr(loader, "save_folder", None)
        if folder is not None and os.path.isdir(folder):
            offload_weight(value.cpu(), full_key, folder, index=index)  # also replaces a safetensors_file entry
            return
        warnings.warn(
            f"{full_key} is offloaded from the model's own safetensors file and no offload folder is set; the pruned "
            "tensor is kept in CPU memory. Pass offload_folder=... when loading to keep it on disk",
            stacklevel=3,
        )
        state_dict[full_key] = value.to("cpu", copy=True)
        return
    raise KeyError(f"{full_key!r} is not in the accelerate weights map of the model")


@contextlib.contextmanager
def onloaded(model: nn.Module, module_name: str, write_back: bool = True) -> Iterator[nn.Module]:
    """Bring an offloaded module's own parameters onto its execution device for the ``with`` body.

    On leaving, the parameters are written back to the accelerate weights map (when ``write_back``) and returned to
    ``meta``, so the next forward loads the changed values. For a module that is not offloaded this does nothing.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> with onloaded(model, "0") as linear:
        ...     _ = linear.weight.data.zero_()
        >>> float(model[0].weight.abs().sum())
        0.0
    """
    from accelerate.utils import set_module_tensor_to_device

    module = model.get_submodule(module_name)
    found = find_offload_hook(model, module_name)
    if found is None:
        yield module
        return
    hook, prefix = found
    names = [name for name, _ in module.named_parameters(recurse=False)]
    for name in names:
        set_module_tensor_to_device(module, name, hook.execution_device, value=hook.weights_map[prefix + name])
    succeeded = False
    try:
        yield module
        succeeded = True
    finally:
        for name in names:
            if write_back and succeeded:
                write_offloaded_tensor(hook.weights_map, prefix + name, getattr(module, name))
            set_module_tensor_to_device(module, name, "meta")
    if names:
        logger.debug("wrote %d offloaded tensors of %s back to the weights map", len(names), module_name)
