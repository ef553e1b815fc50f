"""How much memory the calibration activations need, stated before any work, and a budget check.

Between blocks the driver keeps every calibration sample's hidden states on the storage device (CPU by default);
while a block propagates, its inputs and its outputs exist at once, so the peak is two copies:
``2 * num_samples * sequence_length * hidden_size * bytes_per_element``. ``num_samples`` and ``sequence_length``
bound it; the model's maximum context does not enter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from .errors import InvalidArgumentError

__all__ = [
    "activation_bytes",
    "check_activation_budget",
    "format_bytes",
    "hidden_size_of",
    "release_freed_host_memory",
]

logger = logging.getLogger(__name__)

_LIBC: object = None

ActivationMemory = int | str | Mapping[int | str, int | str]


def model_bytes(model: nn.Module) -> int:
    """The bytes of a model's state (what a save writes), ``meta`` tensors counted by shape and dtype.

    Example:
        >>> model_bytes(nn.Linear(2, 2))
        24
    """
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def format_bytes(num_bytes: float) -> str:
    """A human-readable size in binary units.

    Example:
        >>> format_bytes(3 * 2**30)
        '3.00 GiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.2f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def activation_bytes(num_samples: int, sequence_length: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Peak bytes of block inputs plus outputs for the whole calibration set.

    Example:
        >>> activation_bytes(128, 2048, 4096, torch.float16) / 2**30
        4.0
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_samples * sequence_length * hidden_size * itemsize


def hidden_size_of(model: nn.Module) -> tuple[int, torch.dtype]:
    """The hidden width the decoder blocks pass on, and the dtype of the hidden states (works on meta models).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> hidden_size_of(LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, vocab_size=16)))
        (8, torch.float32)
    """
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(hidden, int):
        hidden = getattr(embeddings, "embedding_dim", None)
    if not isinstance(hidden, int):
        raise InvalidArgumentError(f"cannot tell the hidden size of {type(model).__name__}: no config.hidden_size")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return hidden, dtype


def parse_size(name: str, value: object, shown: object, allowed: str) -> int:
    """A positive byte count from an int or a size string (``"5GB"``, ``"2GiB"``); ``ValueError`` naming ``name``.

    Example:
        >>> parse_size("max_shard_size", "1KiB", "1KiB", "a size")
        1024
    """
    from accelerate.utils import convert_file_size_to_int

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgumentError(f"{name}={shown!r} is invalid; allowed: {allowed}")
    try:
        size = convert_file_size_to_int(value)
    except ValueError:
        raise InvalidArgumentError(f"{name}={shown!r} is invalid; allowed: {allowed}") from None
    if size <= 0:
        raise InvalidArgumentError(f"{name}={shown!r} is invalid; allowed: {allowed}")
    return size


def _budget_for(activation_memory: ActivationMemory, storage: torch.device) -> int | None:
    allowed = "bytes (int), a size such as '2GiB', or accelerate's {device: size} dict, e.g. {'cpu': '8GiB'}"
    if isinstance(activation_memory, Mapping):
        keys = [str(storage), storage.type] + ([storage.index] if storage.index is not None else [])
        value = next((activation_memory[k] for k in keys if k in activation_memory), None)
        if value is None:
            return None
    else:
        value = activation_memory
    return parse_size("activation_memory", value, activation_memory, allowed)


def check_activation_budget(
    model: nn.Module,
    num_samples: int,
    sequence_length: int,
    activation_memory: ActivationMemory | None,
    storage_device: torch.device | str = "cpu",
) -> int:
    """Log the calibration activation memory and refuse a ``activation_memory`` budget that cannot hold it.

    Returns:
        The expected peak activation bytes on ``storage_device``.

    Raises:
        ValueError: when ``activation_memory`` (for ``storage_device``) is smaller than the activations, with the numbers.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=4, vocab_size=64))
        >>> check_activation_budget(model, 16, 128, activation_memory="1MiB")
        524288
    """
    storage = torch.device(storage_device)
    hidden, dtype = hidden_size_of(model)
    needed = activation_bytes(num_samples, sequence_length, hidden, dtype)
    logger.info(
        "calibration activations: %s on %s (2 x %d samples x %d tokens x hidden %d x %s)",
        format_bytes(needed),
        storage,
        num_samples,
        sequence_length,
        hidden,
        dtype,
    )
    budget = None if activation_memory is None else _budget_for(activation_memory, storage)
    if budget is not None and needed > budget:
        raise InvalidArgumentError(
            f"activation_memory={activation_memory!r} gives {format_bytes(budget)} on {storage}, but the calibration activations "
            f"need {format_bytes(needed)} (2 x num_samples={num_samples} x sequence_length={sequence_length} x "
            f"hidden_size={hidden} x {dtype}); lower num_samples or sequence_length, raise activation_memory, or keep "
            "them on disk with activation_cache_dir=..."
        )
    return needed


def release_freed_host_memory() -> bool:
    """Hand memory that has been freed back to the operating system (glibc's ``malloc_trim``); a no-op elsewhere.

    A layer's solver frees tens to hundreds of MB of temporaries at a time. glibc raises its ``mmap`` threshold after
    such frees and keeps later ones in the heap, so without a trim the process's resident memory ratchets up by a
    layer's workspace per layer instead of staying at the working set. The driver calls this after each layer and
    block. Returns whether a trim ran.

    Example:
        >>> isinstance(release_freed_host_memory(), bool)
        True
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        _LIBC = False
        name = ctypes.util.find_library("c")
        if name:
            try:
                libc = ctypes.CDLL(name)
                _LIBC = libc if hasattr(libc, "malloc_trim") else False
            except OSError:
                pass
    if _LIBC is False:
        return False
    _LIBC.malloc_trim(0)  # type: ignore[attr-defined]
    return True
