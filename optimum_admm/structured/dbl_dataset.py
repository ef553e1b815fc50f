"""A multi-domain, packed, weight-driven ``IterableDataset`` whose weights reach data-loader workers.

Each domain is one stream of int32 token ids (documents joined by EOS), cut into sequences of ``sequence_length``
tokens (the tail shorter than a sequence is dropped). Every sample draws its domain from the current weights and
takes that domain's next sequence.

Workers. The weights live in a shared-memory tensor: :meth:`MultiDomainDataset.set_weights` in the main process
is seen by every data-loader worker at its next draw (fork, spawn and forkserver alike, persistent workers too).
With ``W = max(1, num_workers)`` streams, stream ``s`` walks positions ``s, s + W, s + 2W, ...`` of each domain's
(per-epoch shuffled) sequence order, with its own cursor per domain, so workers never repeat each other. After a
resume, loader worker ``i`` plays stream ``(i + r) % W`` with ``r`` = batches consumed modulo ``W``, so the
round-robin order of the data loader continues where it stopped.

Randomness is counter-based: draw ``j`` of worker ``w`` uses ``numpy.random.default_rng([seed, w, j])``. A stream's
whole state is therefore ``(draws, cursor per domain)``; it is kept in shared memory after every sample, together
with a short history, so that the main process can name the exact state after the samples the trainer has
*consumed* (workers and ``accelerate`` prefetch ahead): :meth:`MultiDomainDataset.state_dict`.

Running out. ``on_exhausted="repeat"`` (default) starts the domain's next epoch (a new shuffle, logged);
``"stop"`` ends the worker's stream at the first draw of a domain it has used up, so the mixture is never
silently changed; the data loader stops when every worker has stopped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .dbl_rules import normalize_weights

if TYPE_CHECKING:
    from collections.abc import Iterator

logger = logging.getLogger(__name__)

ON_EXHAUSTED: tuple[str, ...] = ("repeat", "stop")
STATE_FORMAT = 1
DomainSource = Any  # datasets.Dataset (text or input_ids column), a 1-D array/tensor of ids, or a .npy path


def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def tokenize_to_stream(
    source: DomainSource, tokenizer: Any = None, text_column: str = "text", batch_size: int = 256
) -> np.ndarray:
    """Turn one domain's source into a flat int32 token stream.

    Args:
        source: A ``datasets.Dataset`` with a ``text_column`` (needs ``tokenizer``) or an ``input_ids`` column;
            a 1-D array or tensor of token ids; or the path of a ``.npy`` file of ids (memory-mapped, not copied
            when already int32).
        tokenizer: Tokenizer for text sources. Documents are tokenised without special tokens and each is
            followed by ``tokenizer.eos_token_id`` when the tokenizer has one.
        text_column: Name of the text column.
        batch_size: Documents per tokenizer call.

    Returns:
        A 1-D int32 array.

    Raises:
        ValueError: An unsupported source, text without a tokenizer, ids outside ``[0, 2**31)``.

    Example:
        >>> tokenize_to_stream([5, 6, 7]).tolist()
        [5, 6, 7]
    """
    if isinstance(source, (str, os.PathLike)):
        stream = np.load(os.fspath(source), mmap_mode="r")
    elif isinstance(source, (np.ndarray, torch.Tensor, list, tuple)):
        stream = np.asarray(source.numpy() if isinstance(source, torch.Tensor) else source)
    elif hasattr(source, "column_names"):
        stream = _tokenize_dataset(source, tokenizer, text_column, batch_size)
    else:
        raise ValueError(
            f"source must be a datasets.Dataset, a 1-D array of token ids or a .npy path, got {type(source).__name__}"
        )
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise ValueError(f"token ids must be a 1-D integer array, got shape {stream.shape} and dtype {stream.dtype}")
    if stream.dtype != np.int32:
        if stream.size and (stream.min() < 0 or stream.max() >= 2**31):
            raise ValueError(f"token ids must lie in [0, 2**31), got [{stream.min()}, {stream.max()}]")
        stream = stream.astype(np.int32)
    return stream


def _tokenize_dataset(dataset: Any, tokenizer: Any, text_column: str, batch_size: int) -> np.ndarray:
    if "input_ids" in dataset.column_names:
        pieces = [np.asarray(ids, dtype=np.int64) for ids in dataset["input_ids"]]
    elif text_column in dataset.column_names:
        if tokenizer is None:
            raise ValueError(f"tokenizer is None but the dataset holds text (column {text_column!r})")
        eos = getattr(tokenizer, "eos_token_id", None)
        suffix = [eos] if eos is not None else []
        pieces = []
        for start in range(0, len(dataset), batch_size):
            texts = dataset[start : start + batch_size][text_column]
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            pieces.extend(np.asarray(ids + suffix, dtype=np.int64) for ids in encoded)
    else:
        raise ValueError(
            f"dataset has neither an 'input_ids' nor a {text_column!r} column (columns: {dataset.column_names})"
        )
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def collate_packed(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed samples into a causal-LM batch: int64 ``input_ids`` and ``labels`` (a copy).

    Example:
        >>> batch = collate_packed([{"input_ids": torch.tensor([1, 2], dtype=torch.int32)}])
        >>> batch["labels"].dtype, batch["input_ids"].tolist()
        (torch.int64, [[1, 2]])
    """
    input_ids = torch.stack([torch.as_tensor(s["input_ids"]) for s in samples]).long()
    return {"input_ids": input_ids, "labels": input_ids.clone()}


class PackedSequences(torch.utils.data.Dataset):
    """A map-style dataset of fixed-length sequences cut from one token stream (for per-domain validation).

    Args:
        source: Anything :func:`tokenize_to_stream` takes.
        sequence_length: Tokens per sequence.
        tokenizer: Tokenizer for text sources.
        max_tokens: Use only the first ``max_tokens`` tokens of the stream.
        text_column: Name of the text column.

    Example:
        >>> validation = PackedSequences(list(range(10)), sequence_length=4)
        >>> len(validation), validation[1]["input_ids"].tolist()
        (2, [4, 5, 6, 7])
    """

    def __init__(
        self,
        source: DomainSource,
        sequence_length: int,
        tokenizer: Any = None,
        max_tokens: int | None = None,
        text_column: str = "text",
    ) -> None:
        _positive_int("sequence_length", sequence_length, 2)
        if max_tokens is not None:
            _positive_int("max_tokens", max_tokens, sequence_length)
        stream = tokenize_to_stream(source, tokenizer, text_column)[:max_tokens]
        count = len(stream) // sequence_length
        if count == 0:
            raise ValueError(f"source holds {len(stream)} tokens: fewer than sequence_length={sequence_length}")
        self.sequences = torch.from_numpy(np.array(stream[: count * sequence_length]).reshape(count, sequence_length))

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[index]}


class MultiDomainDataset(torch.utils.data.IterableDataset):
    """Packed multi-domain training data, each sample's domain drawn from shared, updatable weights.

    Args:
        domains: ``{name: source}``; a source is anything :func:`tokenize_to_stream` takes. Order is kept.
        sequence_length: Tokens per sample.
        weights: Initial domain weights, a mapping by name or a sequence in domain order; normalised. Default:
            proportional to each domain's number of sequences (the natural mixture).
        tokenizer: Tokenizer for text sources.
        seed: Seed of the domain draws and of the per-epoch shuffles.
        on_exhausted: ``"repeat"`` (start a new, reshuffled epoch of that domain) or ``"stop"`` (end the stream).
        shuffle: Shuffle each domain's sequences, anew every epoch; otherwise read them in order.
        text_column: Name of the text column of ``datasets.Dataset`` sources.
        max_workers: Most data-loader workers the shared state has room for.
        history_size: Samples of per-worker state history kept to rewind prefetching; must exceed the samples a
            worker can run ahead of the trainer (``batch_size * (prefetch_factor + 1)``, plus one batch).

    Samples are ``{"input_ids": int32 tensor [sequence_length]}``; batch them with :func:`collate_packed`.

    Example:
        >>> data = MultiDomainDataset({"a": list(range(100)), "b": list(range(100, 180))}, sequence_length=8,
        ...                           weights={"a": 0.5, "b": 0.5})
        >>> data.num_sequences
        {'a': 12, 'b': 10}
        >>> next(iter(data))["input_ids"].dtype
        torch.int32
        >>> data.set_weights({"a": 0.9, "b": 0.1})
    """

    def __init__(
        self,
        domains: Mapping[str, DomainSource],
        sequence_length: int,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        tokenizer: Any = None,
        seed: int = 0,
        on_exhausted: str = "repeat",
        shuffle: bool = True,
        text_column: str = "text",
        max_workers: int = 8,
        history_size: int = 1024,
    ) -> None:
        super().__init__()
        if not isinstance(domains, Mapping) or not domains:
            raise ValueError(f"domains must be a non-empty mapping of name to source, got {domains!r}")
        self.sequence_length = _positive_int("sequence_length", sequence_length, 2)
        self.seed = _positive_int("seed", seed, 0)
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {list(ON_EXHAUSTED)}, got {on_exhausted!r}")
        self.on_exhausted, self.shuffle = on_exhausted, bool(shuffle)
        self.max_workers = _positive_int("max_workers", max_workers)
        self.history_size = _positive_int("history_size", history_size, 2)
        self.domain_names: tuple[str, ...] = tuple(str(name) for name in domains)
        self._streams = [tokenize_to_stream(src, tokenizer, text_column) for src in domains.values()]
        counts = [len(stream) // self.sequence_length for stream in self._streams]
        empty = [name for name, count in zip(self.domain_names, counts, strict=True) if count == 0]
        if empty:
            raise ValueError(f"domains {empty} hold fewer tokens than sequence_length={self.sequence_length}")
        self.num_sequences: dict[str, int] = dict(zip(self.domain_names, counts, strict=True))
        k = len(self.domain_names)
        # Shared memory: the weights, each stream's live state (draws, cursors), its history, bookkeeping.
        self._weights = torch.zeros(k, dtype=torch.float64).share_memory_()
        self._live = torch.zeros(self.max_workers, 1 + k, dtype=torch.int64).share_memory_()
        self._history = torch.full((self.max_workers, self.history_size, 2 + k), -1, dtype=torch.int64)
        self._history.share_memory_()
        # The weights each recorded sample was drawn with: a checkpoint carries those of the samples drawn ahead of
        # the trainer (prefetched), and a resumed stream draws them again with the same weights (``_replay``).
        self._drawn_with = torch.zeros(self.max_workers, self.history_size, k, dtype=torch.float64).share_memory_()
        self._replay: dict[int, tuple[int, list[list[float]]]] = {}
        # [0]: streams W of the last iteration, [1]: W the loaded state was saved with (0 = any), [2]: rotation r
        # (loader worker i plays stream (i + r) % W, so that a resumed loader continues the round-robin).
        self._meta = torch.zeros(3, dtype=torch.int64).share_memory_()
        self._flags = torch.zeros(self.max_workers, 2, dtype=torch.int64).share_memory_()  # started, stopped
        self.set_weights(counts if weights is None else weights)

    # ------------------------------------------------------------------ weights
    def _weight_vector(self, weights: Mapping[str, float] | Sequence[float] | torch.Tensor) -> torch.Tensor:
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self.domain_names))
            missing = [name for name in self.domain_names if name not in weights]
            if unknown or missing:
                raise ValueError(
                    f"weights must name exactly {list(self.domain_names)}; unknown {unknown}, missing {missing}"
                )
            weights = [float(weights[name]) for name in self.domain_names]
        vector = normalize_weights(weights)
        if vector.numel() != len(self.domain_names):
            raise ValueError(f"weights must have {len(self.domain_names)} entries, got {vector.numel()}")
        return vector

    def set_weights(self, weights: Mapping[str, float] | Sequence[float] | torch.Tensor) -> None:
        """Set the domain weights (normalised); every worker uses them from its next draw on.

        Args:
            weights: A mapping by domain name or a sequence in :attr:`domain_names` order.
        """
        self._weights.copy_(self._weight_vector(weights))

    @property
    def weights(self) -> dict[str, float]:
        """The current domain weights, by name."""
        return dict(zip(self.domain_names, self._weights.tolist(), strict=True))

    # ------------------------------------------------------------------ iteration
    def _permutation(self, domain: int, epoch: int, cache: dict[int, tuple[int, np.ndarray]]) -> np.ndarray:
        count = self.num_sequences[self.domain_names[domain]]
        if not self.shuffle:
            return np.arange(count)
        if domain not in cache or cache[domain][0] != epoch:
            cache[domain] = (epoch, np.random.default_rng([self.seed, domain, epoch]).permutation(count))
        return cache[domain][1]

    def _draw_domain(self, worker: int, draw: int) -> tuple[int, np.ndarray]:
        weights = self._weights.numpy().copy()  # a snapshot: the main process may write at any time
        first, replay = self._replay.get(worker, (0, []))
        if first <= draw < first + len(replay):
            weights = np.asarray(replay[draw - first], dtype=np.float64)
        cdf = np.cumsum(weights / weights.sum())
        u = np.random.default_rng([self.seed, worker, draw]).random()
        return min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1), weights

    def _record(self, worker: int, tag: int, state: torch.Tensor) -> None:
        self._live[worker] = state
        self._history[worker, tag % self.history_size, 0] = tag
        self._history[worker, tag % self.history_size, 1:] = state

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, streams = (0, 1) if info is None else (info.id, info.num_workers)
        worker = (worker + int(self._meta[2])) % streams
        if streams > self.max_workers:
            raise ValueError(f"num_workers={streams} exceeds max_workers={self.max_workers} of MultiDomainDataset")
        saved = int(self._meta[1])
        if saved and saved != streams:
            raise ValueError(
                f"the loaded state was saved with {saved} data stream(s) (max(1, num_workers)); this data loader "
                f"has {streams}. Resume with the same num_workers."
            )
        too_small = [n for n, c in self.num_sequences.items() if c < streams]
        if too_small:
            raise ValueError(f"domains {too_small} hold fewer sequences than the {streams} data-loader workers")
        self._meta[0] = streams
        # Start of this iteration: forget the previous iteration's history, record the start state as sample 0.
        state = self._live[worker].clone()  # [draws, cursor per domain]
        self._history[worker, :, 0] = -1
        self._record(worker, 0, state)
        self._flags[worker] = torch.tensor([1, 0])
        return self._generate(worker, streams, state)

    def _generate(self, worker: int, streams: int, state: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
        cache: dict[int, tuple[int, np.ndarray]] = {}
        produced = 0
        while True:
            domain, weights = self._draw_domain(worker, int(state[0]))
            count = self.num_sequences[self.domain_names[domain]]
            shard = len(range(worker, count, streams))
            epoch, position = divmod(int(state[1 + domain]), shard)
            if epoch > 0 and self.on_exhausted == "stop":
                logger.info("Worker %d: domain %r is used up; its stream stops.", worker, self.domain_names[domain])
                self._flags[worker, 1] = 1
                return
            if epoch > 0 and position == 0:
                logger.info("Worker %d: domain %r starts epoch %d.", worker, self.domain_names[domain], epoch + 1)
            index = int(self._permutation(domain, epoch, cache)[worker + position * streams])
            start = index * self.sequence_length
            tokens = np.array(self._streams[domain][start : start + self.sequence_length], dtype=np.int32)
            state[0] += 1
            state[1 + domain] += 1
            produced += 1
            self._drawn_with[worker, produced % self.history_size] = torch.from_numpy(weights)
            self._record(worker, produced, state)
            yield {"input_ids": torch.from_numpy(tokens)}

    # ------------------------------------------------------------------ state
    def state_dict(self, consumed_batches: int | None = None, batch_size: int | None = None) -> dict[str, Any]:
        """The state to checkpoint: weights, and for every stream its draw counter and cursors.

        Args:
            consumed_batches: Batches the trainer has taken from the current data-loader iterator. With
                ``batch_size``, each stream's state is rewound to just after its last consumed sample (the data
                loader hands out batches from the workers in turn); ``None``: the streams' live state, which runs
                ahead by whatever was prefetched.
            batch_size: Samples per batch (``per_device_train_batch_size``).

        Returns:
            A JSON-serialisable dict; ``cursors`` (sequences taken per domain, all streams) is for reading only;
            ``replay`` holds, per stream, the weights of the samples drawn ahead of the trainer, which a resumed
            stream draws again with those same weights (so that a resume equals the uninterrupted run even though
            the data loader prefetched them before a weight update).

        Raises:
            RuntimeError: A stream ran more than ``history_size`` samples ahead of the trainer.
        """
        streams = max(int(self._meta[0]), int(self._meta[1]), 1)
        rows = self._live[:streams].clone()
        replay: dict[str, list[list[float]]] = {}
        for worker, (first, weights) in self._replay.items():  # loaded and not yet drawn again
            pending = weights[max(0, int(rows[worker, 0]) - first) :] if worker < streams else []
            if pending:
                replay[str(worker)] = pending
        if consumed_batches is not None:
            _positive_int("consumed_batches", consumed_batches, 0)
            _positive_int("batch_size", batch_size)
            for loader_worker in range(streams):
                worker = (loader_worker + int(self._meta[2])) % streams
                if not self._flags[worker, 0] or self._flags[worker, 1]:
                    continue  # not started in this iteration (live = start state), or stopped (live = end state)
                taken = consumed_batches // streams + int(loader_worker < consumed_batches % streams)
                tag = taken * batch_size
                entry = self._history[worker, tag % self.history_size]
                if int(entry[0]) != tag:
                    raise RuntimeError(
                        f"worker {worker} ran more than history_size={self.history_size} samples ahead of the "
                        f"trainer (wanted sample {tag}, found {int(entry[0])}); raise history_size"
                    )
                rows[worker] = entry[1:]
                ahead = self._ahead(worker, tag)
                if ahead:
                    replay[str(worker)] = ahead
                else:
                    replay.pop(str(worker), None)
        return {
            "format": STATE_FORMAT,
            "domains": list(self.domain_names),
            "sequence_length": self.sequence_length,
            "seed": self.seed,
            "weights": self._weights.tolist(),
            "streams": streams,
            "rotation": (int(self._meta[2]) + (consumed_batches or 0)) % streams,
            "draws": rows[:, 0].tolist(),
            "stream_cursors": rows[:, 1:].tolist(),
            "cursors": dict(zip(self.domain_names, rows[:, 1:].sum(dim=0).tolist(), strict=True)),
            "replay": replay,
        }

    def _ahead(self, worker: int, tag: int) -> list[list[float]]:
        """The weights of the samples ``worker`` drew after sample ``tag`` (prefetched, not yet consumed)."""
        live = int(self._live[worker, 0]) - int(self._history[worker, tag % self.history_size, 1])
        produced = [
            t for t in range(tag + 1, tag + 1 + live) if int(self._history[worker, t % self.history_size, 0]) == t
        ]
        return [self._drawn_with[worker, t % self.history_size].tolist() for t in produced]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore weights, draw counters and cursors from :meth:`state_dict` (before iterating).

        Raises:
            ValueError: The state belongs to other domains, another sequence length or seed, or more streams than
                ``max_workers``.
        """
        for key, mine in (
            ("domains", list(self.domain_names)),
            ("sequence_length", self.sequence_length),
            ("seed", self.seed),
        ):
            if state.get(key) != mine:
                raise ValueError(f"state[{key!r}]={state.get(key)!r} does not match this dataset's {mine!r}")
        streams = int(state["streams"])
        if not 1 <= streams <= self.max_workers:
            raise ValueError(f"state['streams']={streams} is outside [1, max_workers={self.max_workers}]")
        self.set_weights(state["weights"])
        self._live.zero_()
        self._live[:streams, 0] = torch.tensor(state["draws"], dtype=torch.int64)
        self._live[:streams, 1:] = torch.tensor(state["stream_cursors"], dtype=torch.int64)
        self._history.fill_(-1)
        self._flags.zero_()
        draws = [int(d) for d in state["draws"]]
        self._replay = {int(w): (draws[int(w)], list(v)) for w, v in (state.get("replay") or {}).items() if v}
        self._meta.copy_(torch.tensor([streams, streams, int(state.get("rotation", 0)) % streams]))
