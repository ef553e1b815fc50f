"""Calibration data: seeded random windows of ``sequence_length`` tokens.

Sources: ``"wikitext2"`` and ``"c4"`` through :func:`datasets.load_dataset` (downloaded from the Hub on first use),
any :class:`datasets.Dataset` with a text column, a list of strings, a path to a local text file, a
:class:`torch.utils.data.DataLoader` (or any iterable) of token-id batches, or a ready ``(num_samples, length)`` tensor.
Texts are joined with ``"\\n\\n"``, tokenised once, and ``num_samples`` windows are drawn at seeded random offsets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["CalibrationSource", "get_calibration_data", "describe_source", "load_named_texts"]

logger = logging.getLogger(__name__)

CalibrationSource = Union[str, os.PathLike, list, "torch.Tensor", Any]
NAMED_DATASETS = ("wikitext2", "c4")


def load_named_texts(name: str, split: str = "train", num_documents: int | None = None) -> list[str]:
    """Texts of a named dataset through :func:`datasets.load_dataset` (network access to the Hub needed once).

    ``"wikitext2"``: ``wikitext``/``wikitext-2-raw-v1``. ``"c4"``: the first English shard of ``allenai/c4``
    (the shard SparseGPT and Wanda calibrate on; ``split="validation"`` gives its validation shard).
    """
    from datasets import load_dataset

    if name == "wikitext2":
        dataset = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    elif name == "c4":
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
        dataset = load_dataset("allenai/c4", data_files={split: shard}, split=split)
    else:
        raise ValueError(f"dataset={name!r} is not a named dataset; allowed: {NAMED_DATASETS}")
    if num_documents is not None:
        dataset = dataset.select(range(min(num_documents, len(dataset))))
    return list(dataset["text"])


def describe_source(source: CalibrationSource) -> str:
    """A short, loggable description of a calibration source (never its contents)."""
    if isinstance(source, str) and source in NAMED_DATASETS:
        return source
    if isinstance(source, (str, os.PathLike)):
        return f"file:{Path(source).name}"
    if isinstance(source, list):
        return f"list[str] ({len(source)} texts)"
    if isinstance(source, torch.Tensor):
        return f"tensor {tuple(source.shape)}"
    return type(source).__name__


def _texts_from(source: CalibrationSource, text_column: str) -> list[str] | None:
    """The texts of a text-like source, or ``None`` when the source is already tokenised."""
    if isinstance(source, str) and source in NAMED_DATASETS:
        # c4 documents are many and short: 20k documents hold far more than any calibration set needs.
        return load_named_texts(source, "train", num_documents=20000 if source == "c4" else None)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"calibration_dataset={str(source)!r} is neither a named dataset {NAMED_DATASETS} nor an existing "
                "text file"
            )
        return [path.read_text(encoding="utf-8")]
    if isinstance(source, list):
        if not source or not all(isinstance(t, str) for t in source):
            raise ValueError("calibration_dataset as a list must be a non-empty list of strings")
        return source
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        if text_column not in source.column_names:
            raise ValueError(
                f"text_column={text_column!r} is not a column of the calibration dataset; its columns are "
                f"{source.column_names}"
            )
        return list(source[text_column])
    return None


def _windows_from_batches(batches: Iterable[Any], num_samples: int, sequence_length: int) -> torch.Tensor:
    rows: list[torch.Tensor] = []
    for batch in batches:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        rows.extend(ids[:, :sequence_length])
        if len(rows) >= num_samples:
            break
    if not rows:
        raise ValueError("calibration_dataset yielded no token batches")
    return torch.stack(rows[:num_samples]).long()


def get_calibration_data(
    source: CalibrationSource,
    tokenizer: Any,
    num_samples: int = 128,
    sequence_length: int = 2048,
    seed: int = 0,
    text_column: str = "text",
) -> torch.Tensor:
    """Token ids of ``num_samples`` calibration windows, shape ``(num_samples, sequence_length)``.

    Raises:
        ValueError: for an unknown source, or a text shorter than one window (with the token counts).

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained("gpt2")  # doctest: +SKIP
        >>> get_calibration_data(["some text " * 500], tok, num_samples=4, sequence_length=64).shape  # doctest: +SKIP
        torch.Size([4, 64])
    """
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise ValueError(f"calibration_dataset tensor must be (num_samples, length); got {tuple(source.shape)}")
        return source[:num_samples, :sequence_length].long()
    texts = _texts_from(source, text_column)
    if texts is None:
        if not isinstance(source, Iterable):
            raise ValueError(
                f"calibration_dataset of type {type(source).__name__} is not supported; allowed: 'wikitext2', 'c4', "
                "a datasets.Dataset, a list of strings, a text file path, a DataLoader of token ids or a tensor"
            )
        return _windows_from_batches(source, num_samples, sequence_length)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn the calibration texts into tokens; pass tokenizer=...")
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        sequence_length -= 1  # keep room for the <bos> token prepended below
    if ids.numel() < sequence_length:
        raise ValueError(
            f"calibration_dataset is too short: {ids.numel()} tokens, but one window needs sequence_length="
            f"{sequence_length} tokens; give more text or lower sequence_length"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - sequence_length + 1, (num_samples,), generator=generator)
    windows = torch.stack([ids[s : s + sequence_length] for s in starts.tolist()])
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        windows = torch.cat([torch.full((num_samples, 1), bos, dtype=windows.dtype), windows], dim=1)
    logger.info("calibration: %d windows of %d tokens from %d tokens", num_samples, windows.shape[1], ids.numel())
    return windows.long()
