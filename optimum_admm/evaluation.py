"""Perplexity of a causal language model over a text, in fixed-length windows.

The documents are joined with ``"\\n\\n"`` and tokenised once into one token stream (without special tokens). The
stream is cut into windows of ``sequence_length`` tokens that start every ``stride`` tokens (by default the windows
do not overlap, as in the SparseGPT and Wanda evaluations). No token is scored twice: with a stride shorter than the
window, each window scores only the tokens that no earlier window scored. A window's first token is context only,
unless a beginning-of-sequence token is prepended to every window (Gemma needs it), in which case it is scored too.
A partial last window is kept. Perplexity is ``exp`` of the mean negative log-likelihood per scored token.

Example:
    >>> from optimum_admm.evaluation import perplexity
    >>> result = perplexity(model, tokenizer, "wikitext2", sequence_length=2048)  # doctest: +SKIP
    >>> round(result.perplexity, 2)  # doctest: +SKIP
    8.71
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

NAMED_DATASETS = ("wikitext2", "c4")


@dataclass(frozen=True)
class PerplexityResult:
    """The outcome of :func:`perplexity`.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: Mean negative log-likelihood per scored token, in nats.
        num_tokens: Number of scored tokens.
        sequence_length: Window length in tokens (including the BOS token when one is prepended).
        num_windows: Number of windows evaluated.

    Example:
        >>> PerplexityResult(perplexity=math.e, nll=1.0, num_tokens=10, sequence_length=8, num_windows=2).nll
        1.0
    """

    perplexity: float
    nll: float
    num_tokens: int
    sequence_length: int
    num_windows: int

    def to_dict(self) -> dict[str, float | int]:
        """Return the result as a plain dictionary (for JSON)."""
        return asdict(self)


def _load_named(name: str) -> list[str]:
    """Load the test text of a named benchmark with ``datasets.load_dataset`` (needs the Hugging Face Hub)."""
    from datasets import load_dataset

    if name == "wikitext2":
        return list(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    # The C4 validation slice used by SparseGPT, Wanda and ADMM-pruning papers: the first shard's first 1,100 texts.
    c4 = load_dataset(
        "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
    )
    return list(c4.select(range(1100))["text"])


def _texts(dataset: Any) -> list[str]:
    """Return ``dataset`` as a list of strings, raising ``ValueError`` for anything else."""
    if isinstance(dataset, str) and dataset in NAMED_DATASETS:
        return _load_named(dataset)
    if isinstance(dataset, (str, os.PathLike)):  # a path, as everywhere else: a text goes in a list
        from .calibration import text_file_source

        return text_file_source(dataset, "dataset", InvalidArgumentError)
    if hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__"):  # a datasets.Dataset
        if "text" not in dataset.column_names:
            raise InvalidArgumentError(f"dataset must have a 'text' column, got columns {dataset.column_names}")
        texts = list(dataset["text"])
    elif isinstance(dataset, Sequence):
        texts = list(dataset)
    else:
        raise InvalidArgumentError(
            f"dataset must be a string, a list of strings or a datasets.Dataset, got {type(dataset)}"
        )
    if not all(isinstance(text, str) for text in texts):
        raise InvalidArgumentError("dataset must contain only strings")
    return texts


def tokenize_dataset(tokenizer: Any, dataset: Any, max_tokens: int | None = None) -> list[int]:
    """Join a dataset's documents with ``"\\n\\n"`` and tokenise them once, without special tokens.

    Args:
        tokenizer: A Hugging Face tokenizer.
        dataset: ``"wikitext2"`` / ``"c4"``, a text file path, a list of strings or a ``datasets.Dataset`` with a
            ``text`` column.
        max_tokens: Keep only the first ``max_tokens`` tokens.

    Returns:
        The token ids.

    Example:
        >>> ids = tokenize_dataset(tokenizer, ["First document.", "Second one."])  # doctest: +SKIP
    """
    text = "\n\n".join(_texts(dataset))
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return list(ids[:max_tokens] if max_tokens is not None else ids)


def default_add_bos(model: Any, tokenizer: Any) -> bool:
    """Whether :func:`perplexity` prepends BOS by default: the tokenizer has one and adds it, or the model is a Gemma.

    Example:
        >>> default_add_bos(model, tokenizer)  # doctest: +SKIP
        False
    """
    if getattr(tokenizer, "bos_token_id", None) is None:
        return False
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return bool(getattr(tokenizer, "add_bos_token", False)) or model_type.startswith("gemma")


def plan_windows(num_tokens: int, content_length: int, stride: int, add_bos: bool) -> list[tuple[int, int, int]]:
    """Return the ``(begin, end, first_scored)`` token ranges of each window over a stream of ``num_tokens``.

    Window ``i`` feeds tokens ``[begin, end)`` (after a BOS token when ``add_bos``) and scores tokens
    ``[first_scored, end)``. No token is scored twice. With BOS every token is scored; without it, the first token
    of each window is context only (so non-overlapping windows leave their first tokens unscored).

    Example:
        >>> plan_windows(10, 4, 4, add_bos=False)
        [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
        >>> plan_windows(10, 4, 4, add_bos=True)
        [(0, 4, 0), (4, 8, 4), (8, 10, 8)]
        >>> plan_windows(6, 4, 2, add_bos=True)
        [(0, 4, 0), (2, 6, 4)]
    """
    offset = 0 if add_bos else 1  # without BOS, a window's first token has no context in it: it is only context
    windows, scored_up_to, begin = [], 0, 0
    while begin + offset < num_tokens and scored_up_to < num_tokens:
        end = min(begin + content_length, num_tokens)
        first = max(scored_up_to, begin + offset)
        if end > first:
            windows.append((begin, end, first))
            scored_up_to = end
        begin += stride
    return windows


def _validate(sequence_length: int, stride: int | None, max_tokens: int | None, batch_size: int) -> None:
    for name, value, low in (("sequence_length", sequence_length, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgumentError(f"{name} must be an integer >= {low}, got {value!r}")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
        raise InvalidArgumentError(f"stride must be a positive integer or None, got {stride!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise InvalidArgumentError(f"max_tokens must be an integer >= 2 or None, got {max_tokens!r}")


def _window_nll(model: Any, input_ids: torch.Tensor, num_scored: int) -> torch.Tensor:
    """Sum of the NLL of the last ``num_scored`` tokens of each row of ``input_ids`` (shape ``[batch]``)."""
    import torch

    logits = model(input_ids=input_ids, use_cache=False).logits[:, -num_scored - 1 : -1, :].float()
    targets = input_ids[:, -num_scored:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll.sum(dim=1, dtype=torch.float64)


def perplexity(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    sequence_length: int = 2048,
    stride: int | None = None,
    max_tokens: int | None = None,
    add_bos: bool | None = None,
    batch_size: int = 1,
    show_progress: bool = True,
) -> PerplexityResult:
    """Compute a causal LM's perplexity on a text, in windows of ``sequence_length`` tokens.

    Args:
        model: A causal LM (``model(input_ids).logits``); it runs on its own device, under ``torch.no_grad``.
        tokenizer: The model's tokenizer.
        dataset: ``"wikitext2"`` / ``"c4"`` (that benchmark's test text, through ``datasets.load_dataset``), the
            path of a text file, a list of strings (texts), or a ``datasets.Dataset`` with a ``text`` column. As in
            :meth:`~optimum_admm.ADMMPruner.prune`, a string is a name or a path, never the text itself.
        sequence_length: Tokens fed to the model per window, including a prepended BOS token.
        stride: Step between window starts, at most the window's text length; default: non-overlapping windows.
            When smaller, each window scores only the tokens no earlier window scored.
        max_tokens: Evaluate only the first ``max_tokens`` tokens of the stream.
        add_bos: Prepend the tokenizer's BOS token to every window. Default: when the tokenizer has one and
            either adds it itself (``add_bos_token``) or the model is a Gemma (which needs it).
        batch_size: Windows per forward pass.
        show_progress: Show a progress bar over the windows (the global switches, such as
            ``transformers.utils.logging.disable_progress_bar()``, also silence it).

    Returns:
        A :class:`PerplexityResult`.

    Raises:
        ValueError: A bad argument (the message names it), checked before any work.

    Example:
        >>> from optimum_admm.zoo import materialize
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> path = materialize("smollm2-135m")  # doctest: +SKIP
        >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
        >>> tokenizer = AutoTokenizer.from_pretrained(path)  # doctest: +SKIP
        >>> perplexity(model, tokenizer, ["Call me Ishmael."], sequence_length=512).num_tokens  # doctest: +SKIP
        4
    """
    _validate(sequence_length, stride, max_tokens, batch_size)
    if add_bos is None:
        add_bos = default_add_bos(model, tokenizer)
    elif add_bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise InvalidArgumentError("add_bos is True but the tokenizer has no bos_token")
    content_length = sequence_length - int(add_bos)
    if stride is not None and stride > content_length:
        raise InvalidArgumentError(f"stride must be at most {content_length} (the window's text length), got {stride}")
    ids = tokenize_dataset(tokenizer, dataset, max_tokens)
    if len(ids) < (1 if add_bos else 2):
        raise InvalidArgumentError(f"dataset holds {len(ids)} token(s): too few to score")
    windows = plan_windows(len(ids), content_length, stride or content_length, add_bos)
    total_nll, total_tokens = _score(model, tokenizer, ids, windows, add_bos, batch_size, show_progress)
    nll = total_nll / total_tokens
    logger.info("Perplexity %.3f over %d tokens in %d windows", math.exp(nll), total_tokens, len(windows))
    return PerplexityResult(math.exp(nll), nll, total_tokens, sequence_length, len(windows))


def _score(
    model: Any,
    tokenizer: Any,
    ids: list[int],
    windows: list[tuple[int, int, int]],
    add_bos: bool,
    batch_size: int,
    show_progress: bool = True,
) -> tuple[float, int]:
    """Run the windows through the model in batches of equal shape; return (summed NLL, scored tokens)."""
    import torch
    from huggingface_hub.utils import tqdm  # honours the global progress-bar switches

    from .stores import input_device

    device = input_device(model)  # not next(model.parameters()): that is `meta` when the first module is offloaded
    prefix = [tokenizer.bos_token_id] if add_bos else []
    # Windows with the same length and number of scored tokens stack into one batch.
    groups: list[list[tuple[int, int, int]]] = []
    for window in windows:
        shape = (window[1] - window[0], window[1] - window[2])
        last = groups[-1] if groups else None
        if last and len(last) < batch_size and (last[0][1] - last[0][0], last[0][1] - last[0][2]) == shape:
            last.append(window)
        else:
            groups.append([window])
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(windows), desc="perplexity", unit="window", leave=False, disable=not show_progress)
        with torch.no_grad(), bar as progress:
            for group in groups:
                rows = [prefix + ids[begin:end] for begin, end, _ in group]
                num_scored = group[0][1] - group[0][2]
                input_ids = torch.tensor(rows, dtype=torch.long, device=device)
                total_nll += float(_window_nll(model, input_ids, num_scored).sum())
                total_tokens += num_scored * len(group)
                progress.update(len(group))
    finally:
        model.train(was_training)
    return total_nll, total_tokens
