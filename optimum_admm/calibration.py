"""Calibration data: seeded random windows of ``sequence_length`` tokens.

Sources: ``"wikitext2"`` and ``"c4"`` through :func:`datasets.load_dataset` (downloaded from the Hub on first use),
any :class:`datasets.Dataset` with a text column, a list of strings, a path to a local text file, a
:class:`torch.utils.data.DataLoader` (or any iterable) of token-id batches, or a ready ``(num_samples, length)`` tensor.
Texts are joined with ``"\\n\\n"``, tokenised once, and ``num_samples`` windows are drawn at seeded random offsets.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from .errors import CalibrationDataError

__all__ = [
    "CalibrationSet",
    "CalibrationSource",
    "check_token_ids",
    "describe_source",
    "get_calibration_data",
    "load_named_texts",
    "read_text_file",
    "vocabulary_size",
    "window_length",
]

logger = logging.getLogger(__name__)

CalibrationSource = Union[str, os.PathLike, list, "torch.Tensor", Any]
NAMED_DATASETS = ("wikitext2", "c4")


def load_named_texts(name: str, split: str = "train", num_documents: int | None = None) -> list[str]:
    """Texts of a named dataset through :func:`datasets.load_dataset` (network access to the Hub needed once).

    ``"wikitext2"``: ``wikitext``/``wikitext-2-raw-v1``. ``"c4"``: the first English shard of ``allenai/c4``
    (the shard SparseGPT and Wanda calibrate on; ``split="validation"`` gives its validation shard).
    """
    if name not in NAMED_DATASETS:
        raise CalibrationDataError(f"dataset={name!r} is not a named dataset; allowed: {NAMED_DATASETS}")
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            dataset = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            shard = (
                "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
            )
            dataset = load_dataset("allenai/c4", data_files={split: shard}, split=split)
    except Exception as err:  # datasets raises many kinds (connection, offline, not found): one explanation
        raise CalibrationDataError(_named_dataset_failure(name, err)) from None
    if num_documents is not None:
        dataset = dataset.select(range(min(num_documents, len(dataset))))
    return list(dataset["text"])


def _named_dataset_failure(name: str, error: Exception) -> str:
    offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "") not in ("", "0")]
    if offline:
        reason = f"{offline[0]}=1 is set and it is not in the datasets cache; unset {offline[0]} once to download it"
    else:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    return f"calibration dataset {name!r} cannot be loaded ({reason}); or pass a local text file instead"


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration windows prepared ahead of the model (the command line checks its data before loading it), with
    the description the report and the card record.

    Example:
        >>> CalibrationSet(torch.zeros(2, 8, dtype=torch.long), "wikitext2").description
        'wikitext2'
    """

    input_ids: torch.Tensor
    description: str


def load_dataset_texts(
    name: str, config: str | None = None, split: str = "train", text_column: str = "text", parameter: str = "dataset"
) -> list[str]:
    """The texts of any dataset ``datasets.load_dataset`` reads: a Hub dataset id (with its ``config`` and
    ``split``) or a local directory of data files; ``text_column`` must hold strings.

    Raises:
        CalibrationDataError: naming ``parameter``, the dataset and what failed (offline mode named).
    """
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many kinds: one explanation, the flag named
        raise CalibrationDataError(f"{parameter} {_named_dataset_failure(name, err)}") from None
    if text_column not in dataset.column_names:
        raise CalibrationDataError(
            f"{parameter} {name}: text_column={text_column!r} is not a column; its columns are {dataset.column_names}"
        )
    return _texts_from(dataset, text_column)


def describe_source(source: CalibrationSource) -> str:
    """A short, loggable description of a calibration source (never its contents)."""
    if isinstance(source, CalibrationSet):
        return source.description
    if isinstance(source, str) and source in NAMED_DATASETS:
        return source
    if isinstance(source, (str, os.PathLike)):
        return f"file:{Path(source).name}"
    if isinstance(source, list):
        return f"list[str] ({len(source)} texts)"
    if isinstance(source, torch.Tensor):
        return f"tensor {tuple(source.shape)}"
    return type(source).__name__


def text_file_source(
    source: str | os.PathLike, parameter: str, error: type[Exception] = CalibrationDataError
) -> list[str]:
    """A string or path that is not a named dataset must be an existing text file: its text, as a one-item list.

    The one rule for every function that takes a dataset (``prune``, ``perplexity``, the CLI): a string is a name or
    a path, never the text itself (a text goes in a list), so a long text is refused with that hint instead of
    ``File name too long`` or being echoed whole.

    Example:
        >>> text_file_source("Call me Ishmael. Some years ago...", "dataset")
        Traceback (most recent call last):
        ...
        optimum_admm.errors.CalibrationDataError: dataset='Call me Ishmael. Some years ago...' is neither a named dataset ('wikitext2', 'c4') nor an existing text file; to pass a text, put it in a list: [text]
    """
    path = Path(source)
    try:
        is_file = path.is_file()
    except OSError:  # a name too long for the file system: text passed where a path belongs
        is_file = False
    if not is_file:
        shown = str(source) if len(str(source)) <= 80 else f"{str(source)[:60]}... ({len(str(source))} characters)"
        hint = "; to pass a text, put it in a list: [text]" if isinstance(source, str) else ""
        raise error(
            f"{parameter}={shown!r} is neither a named dataset {NAMED_DATASETS} nor an existing text file{hint}"
        )
    return [read_text_file(path, parameter)]


def _texts_from(source: CalibrationSource, text_column: str) -> list[str] | None:
    """The texts of a text-like source, or ``None`` when the source is already tokenised."""
    if isinstance(source, str) and source in NAMED_DATASETS:
        # c4 documents are many and short: 20k documents hold far more than any calibration set needs.
        return load_named_texts(source, "train", num_documents=20000 if source == "c4" else None)
    if isinstance(source, (str, os.PathLike)):
        return text_file_source(source, "calibration_dataset", CalibrationDataError)
    if isinstance(source, list) and source and all(isinstance(t, (torch.Tensor, dict)) for t in source):
        return None  # a list of token batches
    if isinstance(source, list):
        if not source or not all(isinstance(t, str) for t in source):
            raise CalibrationDataError("calibration_dataset as a list must be a non-empty list of strings")
        return source
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        if text_column not in source.column_names:
            raise CalibrationDataError(
                f"text_column={text_column!r} is not a column of the calibration dataset; its columns are "
                f"{source.column_names}"
            )
        texts = list(source[text_column])
        bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
        if bad is not None:
            raise CalibrationDataError(
                f"text_column={text_column!r} holds a {type(texts[bad]).__name__} at row {bad}; allowed: a column of "
                "strings (a tokenised dataset goes in as a DataLoader of input_ids)"
            )
        return texts
    return None


def read_text_file(path: str | os.PathLike, parameter: str) -> str:
    """A text file's content as UTF-8, or a :class:`CalibrationDataError` naming ``parameter``, the file and where
    it stops being text.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "calib.txt"
        >>> _ = path.write_bytes(b"caf\\xe9")
        >>> read_text_file(path, "--dataset")
        Traceback (most recent call last):
        ...
        optimum_admm.errors.CalibrationDataError: --dataset ...calib.txt is not UTF-8 text: byte 0xe9 at offset 3 ...
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationDataError(
            f"{parameter} {str(path)} is not UTF-8 text: byte 0x{err.object[err.start]:02x} at offset {err.start} "
            "cannot be decoded; convert it to UTF-8 (iconv -t utf-8) or give another file"
        ) from None
    except OSError as err:
        raise CalibrationDataError(f"{parameter} {str(path)} cannot be read: {err.strerror or err}") from None


def window_length(model_config: Any, requested: int) -> int:
    """The calibration window length for a model: ``requested``, capped (with a warning) at its positions.

    Example:
        >>> from types import SimpleNamespace
        >>> window_length(SimpleNamespace(max_position_embeddings=4096), 2048)
        2048
    """
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        limit = getattr(model_config, attribute, None)
        if isinstance(limit, int) and limit > 0:
            if limit < requested:
                warnings.warn(
                    f"sequence_length={requested} exceeds the model's {limit} positions; calibrating at {limit}",
                    stacklevel=3,
                )
                return limit
            break
    return requested


def vocabulary_size(model: Any) -> int | None:
    """The number of rows of the model's input embedding (``None`` when it has no ``nn.Embedding``).

    Example:
        >>> vocabulary_size(None) is None
        True
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embeddings, "num_embeddings", None)
    return size if isinstance(size, int) else None


def check_token_ids(ids: Any, where: str, vocab_size: int | None = None) -> torch.Tensor:
    """Token ids as a 2-D integer tensor, refused when they are not: the shape, dtype or an id out of the vocabulary
    is named. ``where`` names the source (``"calibration_dataset"``, ``"calibration_dataset batch 3"``)."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 2:
        raise CalibrationDataError(
            f"{where} has shape {tuple(ids.shape)}; allowed: token ids of shape (batch, length)"
            + (" (squeeze the extra dimension)" if ids.dim() == 3 and 1 in ids.shape[:2] else "")
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise CalibrationDataError(f"{where} has dtype {ids.dtype}; allowed: integer token ids (torch.long)")
    if ids.numel() and vocab_size is not None:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise CalibrationDataError(
                f"{where} holds token id {bad}; allowed: 0 to {vocab_size - 1} (the vocabulary)"
            )
    return ids.long()


def _short_warning(length: int, sequence_length: int) -> None:
    if length < sequence_length:
        warnings.warn(
            f"the calibration token batches hold {length} tokens per row, fewer than sequence_length="
            f"{sequence_length}; calibrating on {length} tokens per sample",
            stacklevel=4,
        )


def _windows_from_batches(
    batches: Iterable[Any], num_samples: int, sequence_length: int, vocab_size: int | None
) -> torch.Tensor:
    rows: list[torch.Tensor] = []
    for index, batch in enumerate(batches):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        ids = check_token_ids(ids, f"calibration_dataset batch {index}", vocab_size)
        if rows and min(int(ids.shape[1]), sequence_length) != rows[0].shape[0]:
            raise CalibrationDataError(
                f"calibration_dataset batch {index} has rows of {ids.shape[1]} tokens, earlier batches "
                f"{rows[0].shape[0]}; allowed: batches of equal length (pad-free windows), at least sequence_length"
            )
        rows.extend(ids[:, :sequence_length])
        if len(rows) >= num_samples:
            break
    if not rows:
        raise CalibrationDataError("calibration_dataset yielded no token batches")
    _short_warning(int(rows[0].shape[0]), sequence_length)
    return torch.stack(rows[:num_samples]).long()


def get_calibration_data(
    source: CalibrationSource,
    tokenizer: Any,
    num_samples: int = 128,
    sequence_length: int = 2048,
    seed: int = 0,
    text_column: str = "text",
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Token ids of ``num_samples`` calibration windows, shape ``(num_samples, sequence_length)``.

    Token batches and tensors must be 2-D integer ids inside the vocabulary (``vocab_size``, when known) and of equal
    length; rows shorter than ``sequence_length`` are used as they are, with a warning that gives the length.

    Raises:
        ValueError: for an unknown source, or a text shorter than one window (with the token counts).

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained("gpt2")  # doctest: +SKIP
        >>> get_calibration_data(["some text " * 500], tok, num_samples=4, sequence_length=64).shape  # doctest: +SKIP
        torch.Size([4, 64])
    """
    if isinstance(source, CalibrationSet):
        source = source.input_ids
    if isinstance(source, torch.Tensor):
        ids = check_token_ids(source, "calibration_dataset", vocab_size)
        _short_warning(int(ids.shape[1]), sequence_length)
        return ids[:num_samples, :sequence_length]
    texts = _texts_from(source, text_column)
    if texts is None:
        if not isinstance(source, Iterable):
            raise CalibrationDataError(
                f"calibration_dataset of type {type(source).__name__} is not supported; allowed: 'wikitext2', 'c4', "
                "a datasets.Dataset, a list of strings, a text file path, a DataLoader of token ids or a tensor"
            )
        return _windows_from_batches(source, num_samples, sequence_length, vocab_size)
    if tokenizer is None:
        raise CalibrationDataError(
            "a tokenizer is needed to turn the calibration texts into tokens; pass tokenizer=..."
        )
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        sequence_length -= 1  # keep room for the <bos> token prepended below
    if ids.numel() < sequence_length:
        raise CalibrationDataError(
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


def calibration_batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The ``(batch, sequence_length)`` tensors the driver runs through each block: ``batch_size`` windows each, one
    each when several processes prune (they shard the calibration by sample).

    Example:
        >>> [tuple(b.shape) for b in calibration_batches(torch.zeros(5, 4, dtype=torch.long), 2)]
        [(2, 4), (2, 4), (1, 4)]
    """
    from .distributed import current

    return list(ids.split(1 if current().enabled else batch_size))
