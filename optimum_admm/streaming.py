"""Streaming mode: prune a safetensors checkpoint directory without ever holding the whole model in memory.

The model is built as a skeleton on the ``meta`` device (``accelerate.init_empty_weights``), its tensor names
matched to the checkpoint's through the renamings ``from_pretrained`` applies. For the input capture only the small
modules outside the decoder blocks are loaded, and of the input embedding only the rows of the calibration tokens
(a forward through a memory-mapped embedding would page most of it in). Then, for each block in order, its tensors
are read from the source shards with safetensors' lazy ``safe_open`` and placed with accelerate's
``set_module_tensor_to_device`` on the execution device; the block is calibrated, pruned and propagated by the one
driver, :func:`optimum_admm.sequential.prune_model`, through a :class:`CheckpointStore` (so the result is bitwise
identical to an in-memory prune), written to its own output shard and returned to ``meta``. The non-block modules are
loaded again only to be written, at the end, so while the blocks are pruned peak memory is one block + the
calibration activations + the method's statistics (a Gram per distinct input for ADMM and SparseGPT, input norms for
Wanda) + one layer's solver workspace (for Wanda and magnitude, which zero weights in place, a one-byte-per-weight
mask).

The output directory (one shard per block plus one for the rest, an index, the allow-listed config and tokenizer
files, ``pruning_config.json`` and the model card) is staged beside ``save_dir`` and renamed into place when complete;
the source is only read, and neither its other weight files nor its card are copied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import resume
from .calibration import (
    CalibrationSource,
    calibration_batches,
    describe_source,
    get_calibration_data,
    vocabulary_size,
    window_length,
)
from .configuration import PruningConfig
from .distributed import current as current_group
from .errors import InvalidArgumentError
from .export import check_save_dir, write_pruning_files
from .files import staged_directory
from .inspection import config_section
from .memory import ActivationMemory, release_freed_host_memory
from .registry import get_spec
from .reporting import PhaseTimer, PruningReport
from .sequential import prune_model
from .stores import WeightStore

__all__ = ["COPIED_FILES", "CheckpointStore", "StreamingResult", "prune_checkpoint", "checkpoint_weight_map"]

logger = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"


@dataclass
class StreamingResult:
    """What :func:`prune_checkpoint` did, with the time split between reading, computing and writing.

    Example:
        >>> StreamingResult(report=None, save_dir=Path("out")).load_seconds
        0.0
    """

    report: PruningReport | None
    save_dir: Path
    load_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    shards: list[str] = field(default_factory=list)
    #: What the ``evaluate`` callback returned (also in the sidecar and the card).
    evaluation: Mapping[str, Any] | None = None


def checkpoint_weight_map(source: str | os.PathLike) -> dict[str, str]:
    """``{tensor name: shard file name}`` of a safetensors checkpoint directory (sharded or single file).

    Example:
        >>> checkpoint_weight_map("path/to/model")  # doctest: +SKIP
        {'model.embed_tokens.weight': 'model-00001-of-00002.safetensors', ...}
    """
    from safetensors import safe_open

    directory = Path(source)
    if (directory / _INDEX).is_file():
        return dict(json.loads((directory / _INDEX).read_text())["weight_map"])
    single = directory / "model.safetensors"
    if not single.is_file():
        raise InvalidArgumentError(
            f"source={str(source)!r} is invalid; allowed: a directory with model.safetensors or {_INDEX} "
            "(streaming mode reads safetensors only)"
        )
    with safe_open(str(single), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single.name)


@dataclass
class _Checkpoint:
    """A source checkpoint directory with its tensors under the names the model gives them."""

    directory: Path
    files: dict[str, str]  # model tensor name -> shard file
    stored: dict[str, str]  # model tensor name -> its name in the shard (differs where transformers renames on load)
    #: model tensors that transformers builds on load from several stored ones (fused experts from per-expert
    #: matrices): model name -> (the converter, {source pattern: [(stored name, shard file)] in expert order})
    merged: dict[str, tuple[Any, dict[str, list[tuple[str, str]]]]] = field(default_factory=dict)

    def open(self, key: str, device: torch.device | str = "cpu") -> Any:
        from safetensors import safe_open

        return safe_open(str(self.directory / self.files[key]), framework="pt", device=str(device))

    def read_merged(self, key: str, device, config: Any) -> torch.Tensor:
        """Build a merged tensor as ``from_pretrained`` does: each part read, then the converter's operations."""
        from safetensors import safe_open

        converter, parts = self.merged[key]
        inputs: dict[str, list[torch.Tensor]] = {}
        for pattern, sources in parts.items():
            tensors = []
            for stored, file in sources:
                with safe_open(str(self.directory / file), framework="pt", device=str(device)) as handle:
                    tensors.append(handle.get_tensor(stored))
            inputs[pattern] = tensors
        for operation in converter.operations:
            inputs = operation.convert(inputs, converter.source_patterns, converter.target_patterns, config=config)
        (value,) = inputs.values()
        return value


def _part_index(stored: str, pattern: str) -> int:
    """The expert index a ``*`` of a converter's source pattern matches in a stored name."""
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    found = re.search(regex, stored)
    return int(found.group(1)) if found and found.groups() else 0


def _model_names(model: nn.Module, stored_names: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """``{model tensor name: stored name}`` through the renamings ``from_pretrained`` applies to checkpoint keys
    (GPT-NeoX's ``embed_out`` is the model's ``lm_head``, legacy ``gamma``/``beta``, a missing or extra base-model
    prefix), and the tensors transformers merges on load from several stored ones (per-expert matrices into fused
    experts): ``{model name: (converter, {pattern: [stored names in order]})}``."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # a transformers without load-time conversions: the stored names are the model's
        return {name: name for name in stored_names}, {}
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    names: dict[str, str] = {}
    merged: dict[str, Any] = {}
    for stored in stored_names:
        name, converted = rename_source_key(stored, renamings, converters, model.base_model_prefix, meta_state)
        if converted is None:
            names[name] = stored
            continue
        converter = next(c for c in converters if converted in c.source_patterns)
        _, parts = merged.setdefault(name, (converter, {p: [] for p in converter.source_patterns}))
        parts[converted].append(stored)
    for name, (_, parts) in merged.items():
        for pattern in parts:
            parts[pattern] = sorted(parts[pattern], key=lambda stored, p=pattern: _part_index(stored, p))
        names[name] = next(iter(parts.values()))[0]
    return names, merged


def _load_tensors(model: nn.Module, checkpoint: _Checkpoint, names: list[str], device, page_in: bool = True) -> None:
    """Read ``names`` from the shards onto ``device`` into the skeleton (timed by the store's ``load`` phase).

    ``page_in=False`` leaves CPU tensors mapped lazily (modules a forward may not read, such as an untied head).
    """
    from accelerate.utils import set_module_tensor_to_device

    by_file: dict[str, list[str]] = {}
    for name in names:
        if name in checkpoint.merged:  # fused experts, built from their per-expert tensors as on load
            value = checkpoint.read_merged(name, device, model.config)
            set_module_tensor_to_device(model, name, device, value=value)
            continue
        by_file.setdefault(checkpoint.files[name], []).append(name)
    for keys in by_file.values():
        with checkpoint.open(keys[0], device) as handle:
            for key in keys:
                value = handle.get_tensor(checkpoint.stored[key])
                if page_in and value.device.type == "cpu":
                    _page_in(value)
                set_module_tensor_to_device(model, key, device, value=value)


def _page_in(tensor: torch.Tensor) -> None:
    """Read one element per 4 KiB page of a tensor that safetensors memory-mapped from disk.

    On CPU ``get_tensor`` maps the file lazily; the disk reads would otherwise happen at the first forward and be
    counted as compute. Paging in here makes read errors surface while loading and the time split truthful.
    """
    if tensor.numel() and tensor.is_contiguous():
        step = max(1, 4096 // tensor.element_size())
        tensor.reshape(-1)[::step].sum()


def _free(model: nn.Module, names: list[str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        set_module_tensor_to_device(model, name, "meta")


def _block_tensors(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {n: state[n].detach().to("cpu").contiguous() for n in names}


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (``{name: {dtype, shape, data_offsets}}``) and where its data starts."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size)), 8 + size


def _copy_tensors(checkpoint: _Checkpoint, names: list[str], path: Path, chunk: int = 1 << 24) -> None:
    """Write the tensors ``names`` (model names) as stored in the source into one safetensors file, copying their
    bytes from the source shards ``chunk`` bytes at a time: none of them is ever held in memory."""
    headers: dict[str, tuple[dict[str, Any], int]] = {}
    sources, header, offset = [], {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        file = checkpoint.files[name]
        if file not in headers:
            headers[file] = _read_header(checkpoint.directory / file)
        stored, data_start = headers[file]
        info = stored[checkpoint.stored[name]]
        begin, end = info["data_offsets"]
        header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + end - begin]}
        sources.append((checkpoint.directory / file, data_start + begin, end - begin))
        offset += end - begin
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        for source, start, length in sources:
            with open(source, "rb") as handle:
                handle.seek(start)
                while length:
                    data = handle.read(min(chunk, length))
                    if not data:
                        raise OSError(f"{source} ends inside a tensor: a truncated safetensors file")
                    out.write(data)
                    length -= len(data)


def _write_shard(model: nn.Module, names: list[str], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(_block_tensors(model, names), str(path), metadata={"format": "pt"})


def _shard_name(index: int, total: int) -> str:
    """Shard 1 holds the modules outside the blocks; block ``index`` is shard ``index + 2``."""
    return f"model-{index + 2:05d}-of-{total:05d}.safetensors"


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link when source and target share a file system (no second write), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _source_digest(checkpoint: _Checkpoint, embedding_key: str | None) -> str:
    """What identifies the source for resuming: its tensor names and shards, and the input embedding's values
    (read in chunks of rows: the whole embedding is never held)."""
    import hashlib

    stored = sorted((checkpoint.stored[k], checkpoint.files[k]) for k in checkpoint.files)
    stored += sorted(
        (k, [s for sources in parts.values() for s in sources]) for k, (_, parts) in checkpoint.merged.items()
    )
    digest = hashlib.sha256(json.dumps(stored).encode())
    if embedding_key is not None:
        with checkpoint.open(embedding_key) as handle:
            view = handle.get_slice(checkpoint.stored[embedding_key])
            shape = view.get_shape()
            rows = max(1, (1 << 22) // max(1, math.prod(shape[1:])))
            for start in range(0, shape[0], rows):
                resume._hash_tensor(digest, view[start : start + rows])
    return digest.hexdigest()[:16]


def _skeleton(source: Path, weight_map: dict[str, str]) -> tuple[nn.Module, _Checkpoint]:
    """The model on ``meta`` and the checkpoint with its tensors named as the model names them."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    first = next(iter(weight_map))
    with safe_open(str(source / weight_map[first]), framework="pt") as handle:
        dtype = handle.get_slice(first).get_dtype()
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(dtype, torch.float32)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=dtype)
    stored, merged = _model_names(model, list(weight_map))
    unknown = sorted(stored[name] for name in set(stored) - set(model.state_dict()))
    if unknown:
        raise InvalidArgumentError(f"source={str(source)!r} holds tensors the model does not name: {unknown[:5]}")
    files = {name: weight_map[stored_name] for name, stored_name in stored.items()}
    parts = {
        name: (converter, {p: [(s, weight_map[s]) for s in names] for p, names in sources.items()})
        for name, (converter, sources) in merged.items()
    }
    return model.eval(), _Checkpoint(source, files, stored, parts)


#: What a streamed output copies from the source besides the weights: the config, the generation config and the
#: tokenizer. Never the source's weights in another format, its model card or anything else.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class CheckpointStore(WeightStore):
    """A safetensors checkpoint pruned block by block into a staged output directory.

    The model is a skeleton on ``meta``; a block's tensors are read from the source shards (``safe_open``) onto the
    execution device when it is loaded and returned to ``meta`` when it is released. A committed block is written
    to its own output shard (or hard-linked from the resume checkpoint that recorded it); :meth:`finish` writes the
    modules outside the blocks, the index and the allow-listed :data:`COPIED_FILES`.

    Example:
        >>> model, checkpoint = _skeleton(Path("llama"), checkpoint_weight_map("llama"))  # doctest: +SKIP
        >>> store = CheckpointStore(model, checkpoint, Path("staging"), torch.device("cpu"))  # doctest: +SKIP
    """

    resident = False

    def __init__(self, model, checkpoint: _Checkpoint, staging: Path | None, device: torch.device, timer=None) -> None:
        super().__init__(model, timer)
        self.checkpoint, self.staging, self.device = checkpoint, staging, device
        self.block_keys: list[list[str]] = []
        self.other_keys: list[str] = []
        self.embedding_key: str | None = None
        self.shards: list[str] = []
        self._early: list[str] = []

    def bind(self, blocks_name: str, blocks: nn.ModuleList) -> None:
        super().bind(blocks_name, blocks)
        files = self.checkpoint.files
        self.block_keys = [
            sorted(k for k in files if k.startswith(f"{self.block_name(i)}.")) for i in range(len(blocks))
        ]
        in_blocks = {k for keys in self.block_keys for k in keys}
        self.other_keys = sorted(set(files) - in_blocks)
        merged_outside = [k for k in self.other_keys if k in self.checkpoint.merged]
        if merged_outside:  # copied as stored, never rebuilt: only the decoder blocks' tensors may be merged
            raise InvalidArgumentError(
                f"source tensor {merged_outside[0]!r} outside the decoder blocks is merged by transformers on load; "
                "allowed in streaming mode: merged tensors inside the decoder blocks only. Prune the loaded model"
            )
        self.embedding_key = _input_embedding_key(self.model, files)

    def _shard(self, index: int) -> str:
        return _shard_name(index, len(self.blocks) + 1)

    def prepare_capture(self, batches: list[torch.Tensor]):
        # Only the capture reads modules outside the blocks, and of the input embedding only the rows of the
        # calibration tokens (see _embedding_rows).
        self._early = [k for k in self.other_keys if k != self.embedding_key]
        with self.timer.phase("load"):
            _load_tensors(self.model, self.checkpoint, self._early, self.device, page_in=False)
            self.model.tie_weights()
            if self.embedding_key is None:
                return None
            return _embedding_rows(self.model, self.checkpoint, self.embedding_key, batches, self.device)

    def end_capture(self) -> None:
        # The embeddings, final norm and head are not needed again until they are written: hold one block only.
        _free(self.model, self._early)
        self._early = []
        self.model.tie_weights()

    def load_block(self, index: int) -> None:
        if any(p.device.type == "meta" for p in self.blocks[index].parameters()):
            with self.timer.phase("load"):
                _load_tensors(self.model, self.checkpoint, self.block_keys[index], self.device)

    def release_block(self, index: int) -> None:
        _free(self.model, self.block_keys[index])
        release_freed_host_memory()  # the block's tensors and forward temporaries, before the next block is read

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        return _block_tensors(self.model, self.block_keys[index])

    def restore_block(self, index: int, recorded: Path) -> None:
        if self.staging is None:  # a rank that does not write
            return
        with self.timer.phase("write"):
            _link_or_copy(recorded, self.staging / self._shard(index))

    def commit_block(self, index: int, recorded: Path | None) -> None:
        if self.staging is None:
            return
        with self.timer.phase("write"):
            if recorded is not None:
                _link_or_copy(recorded, self.staging / self._shard(index))
            else:
                _write_shard(self.model, self.block_keys[index], self.staging / self._shard(index))

    def identity(self) -> dict[str, Any]:
        with self.timer.phase("load"):
            return {"source": _source_digest(self.checkpoint, self.embedding_key)}

    def finish(self) -> list[str]:
        """Write the non-block shard, the index and the copied files; returns the shard names."""
        first = f"model-00001-of-{len(self.blocks) + 1:05d}.safetensors"
        shards = [self._shard(i) for i in range(len(self.blocks))]
        if self.staging is None:
            return [first, *shards]
        with self.timer.phase("write"):  # unpruned: copied from the source in chunks, never held (an embedding is
            _copy_tensors(self.checkpoint, self.other_keys, self.staging / first)  # often larger than a block)
            weight_map = dict.fromkeys(self.other_keys, first)
            for shard, keys in zip(shards, self.block_keys, strict=True):
                weight_map.update(dict.fromkeys(keys, shard))
            size = sum((self.staging / f).stat().st_size for f in [first, *shards])
            index = {"metadata": {"total_size": size}, "weight_map": weight_map}
            (self.staging / _INDEX).write_text(json.dumps(index, indent=2))
            for name in COPIED_FILES:
                if (self.checkpoint.directory / name).is_file():
                    shutil.copy2(self.checkpoint.directory / name, self.staging / name)
        return [first, *shards]

    def mark_pruned(self, section: dict[str, Any]) -> None:
        """Add the ``pruning`` section to the staged ``config.json`` (what ``prune()`` sets on a loaded model)."""
        if self.staging is None:
            return
        path = self.staging / "config.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        data["pruning"] = section
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _calibration_batches(model, source: Path, config: PruningConfig, dataset, tokenizer):
    """The calibration windows (one batch each) and their description for the report; ``(None, {})`` without."""
    if not config.needs_calibration:
        return None, {}
    if dataset is None:
        raise InvalidArgumentError(f"calibration_dataset=None is invalid for method {config.method!r}")
    if tokenizer is None and not isinstance(dataset, torch.Tensor):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    length = window_length(model.config, config.sequence_length)
    vocab = vocabulary_size(model)
    ids = get_calibration_data(dataset, tokenizer, config.num_samples, length, seed=config.seed, vocab_size=vocab)
    calibration = {"dataset": describe_source(dataset), "num_samples": int(ids.shape[0])}
    calibration.update({"sequence_length": int(ids.shape[1]), "seed": config.seed})
    return calibration_batches(ids, config.calibration_batch_size), calibration


def prune_checkpoint(
    source: str | os.PathLike,
    save_dir: str | os.PathLike,
    config: PruningConfig,
    calibration_dataset: CalibrationSource | None = None,
    tokenizer: Any = None,
    *,
    execution_device: torch.device | str = "cpu",
    storage_device: torch.device | str = "cpu",
    activation_memory: ActivationMemory | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    activation_cache_dir: str | os.PathLike | None = None,
    evaluate: Callable[[Path], Mapping[str, Any] | None] | None = None,
    model_card: bool = True,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    allow_unpruned: bool = False,
) -> StreamingResult:
    """Prune the checkpoint in ``source`` block by block into ``save_dir``, holding one block at a time.

    The blocks go through the same driver as an in-memory prune (:func:`optimum_admm.sequential.prune_model`) over
    a :class:`CheckpointStore`, so the result is bitwise identical. The output (shards, index, config, tokenizer
    files, ``pruning_config.json`` and the model card) is complete before it is renamed into ``save_dir``.

    Args:
        source: a local directory with safetensors weights (sharded or not) and ``config.json``; only read.
        save_dir: the output directory (loads with ``AutoModelForCausalLM.from_pretrained``).
        config: the pruning recipe.
        calibration_dataset: as for :meth:`ADMMPruner.prune`; not needed by methods that use no calibration data.
        tokenizer: tokenizer for text calibration data (default: loaded from ``source``).
        execution_device: where each block is loaded and computed.
        storage_device: where the calibration activations wait between blocks.
        activation_memory: activation budget on ``storage_device`` (see :func:`optimum_admm.memory.check_activation_budget`).
        overwrite: replace a non-empty ``save_dir``.
        show_progress: show a tqdm bar over the blocks.
        checkpoint_dir: record each finished block there (its output shard and the next block's inputs) and, when
            it already holds a run of the same recipe, checkpoint and data, continue from the next block; see
            :mod:`optimum_admm.resume`. The output is still only renamed into ``save_dir`` when complete.
        activation_cache_dir: keep the calibration activations in memory-mapped files there instead of on
            ``storage_device`` (see :mod:`optimum_admm.activations`).
        evaluate: called with the staged output directory once its weights are complete; what it returns
            (``{dataset: perplexity}``) goes into the sidecar and the card, before the output is renamed into place.
        model_card: write a ``README.md`` model card (never the source's).
        base_model: Hub id of the dense model, for the card.
        license: the card's license.
        repo_id: the Hub repo the output is meant for (the card's usage snippet).
        allow_unpruned: as for :func:`optimum_admm.sequential.prune_model`.

    Example:
        >>> from optimum_admm import ADMMConfig
        >>> result = prune_checkpoint("llama-7b", "llama-7b-admm", ADMMConfig(), "wikitext2",  # doctest: +SKIP
        ...     execution_device="cuda:0")
        >>> result.load_seconds, result.compute_seconds, result.write_seconds  # doctest: +SKIP
    """
    timer = PhaseTimer()
    source, target = Path(source), check_save_dir(save_dir, overwrite)
    get_spec(config)  # an unregistered config fails before anything is read
    with timer.phase("load"):
        model, checkpoint = _skeleton(source, checkpoint_weight_map(source))
    batches, calibration = _calibration_batches(model, source, config, calibration_dataset, tokenizer)
    card = None
    if model_card:
        card = {"base_model": base_model, "license": license, "repo_id": repo_id, "location": os.fspath(save_dir)}
    group = current_group()  # with several ranks, rank 0 writes the output and the others only compute
    with staged_directory(target) if group.is_main else contextlib.nullcontext() as staging:
        store = CheckpointStore(model, checkpoint, staging, torch.device(execution_device), timer)
        report = prune_model(
            model,
            config,
            batches,
            storage_device,
            show_progress,
            activation_memory=activation_memory,
            checkpoint_dir=checkpoint_dir,
            activation_cache_dir=activation_cache_dir,
            store=store,
            allow_unpruned=allow_unpruned,
        )
        report.calibration = calibration
        shards, evaluation = store.finish(), None
        store.mark_pruned(config_section(config.method, report.sparsity, config.mask_structure))
        if staging is not None:
            evaluation = evaluate(staging) if evaluate is not None else None
            with timer.phase("write"):
                write_pruning_files(
                    staging, config, report, evaluation_results=evaluation, card_kwargs=card, model_config=model.config
                )
    group.barrier()  # the output is in place before any rank returns
    load, write = timer.seconds["load"], timer.seconds["write"]
    report.load_seconds, report.write_seconds, report.total_seconds = load, write, timer.wall
    result = StreamingResult(report, target, load, report.total_seconds - load - write, write, shards)
    result.evaluation = evaluation
    logger.info(
        "streamed %d blocks: load %.1fs, compute %.1fs, write %.1fs",
        len(store.blocks),
        load,
        result.compute_seconds,
        write,
    )
    return result


def _input_embedding_key(model: nn.Module, weight_map: dict[str, str]) -> str | None:
    """The checkpoint name of the input embedding matrix, or ``None`` when it cannot be read on its own."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding):
        return None
    for name, module in model.named_modules():
        if module is embeddings:
            key = f"{name}.weight" if name else "weight"
            return key if key in weight_map else None
    return None


def _row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering sorted distinct integers: ``[1, 2, 3, 7]`` -> ``[(1, 4), (7, 8)]``."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def _embedding_rows(model, checkpoint, key, batches, device):
    """An ``embed`` function for the capture that holds only the embedding rows of the calibration tokens.

    A forward through a memory-mapped embedding would page in most of it (tokens are spread over the vocabulary and
    the kernel maps the pages around each one read), and for large vocabularies the embedding is bigger than a
    block. The distinct token ids are read with ``safe_open(...).get_slice`` in contiguous runs; the model's own
    embedding module (with any scaling it applies) embeds each batch through a compact weight of those rows only.
    """
    module = model.get_input_embeddings()
    rows = torch.unique(torch.cat([batch.reshape(-1) for batch in batches]))  # sorted
    with checkpoint.open(key) as handle:
        view = handle.get_slice(checkpoint.stored[key])
        vocabulary = int(view.get_shape()[0])
        if int(rows[0]) < 0 or int(rows[-1]) >= vocabulary:
            bad = int(rows[0]) if int(rows[0]) < 0 else int(rows[-1])
            raise InvalidArgumentError(
                f"calibration token id {bad} is invalid; allowed: 0 to {vocabulary - 1} (the vocabulary)"
            )
        compact = torch.cat([view[a:b] for a, b in _row_runs(rows.tolist())])
    compact = nn.Parameter(compact.to(device=device, dtype=module.weight.dtype), requires_grad=False)

    def embed(batch: torch.Tensor) -> torch.Tensor:
        saved = module._parameters["weight"]
        module._parameters["weight"] = compact
        try:
            return module(torch.searchsorted(rows, batch).to(device))
        finally:
            module._parameters["weight"] = saved

    return embed
