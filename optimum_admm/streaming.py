"""Streaming mode: prune a safetensors checkpoint directory without ever holding the whole model in memory.

The model is built as a skeleton on the ``meta`` device (``accelerate.init_empty_weights``), its tensor names
matched to the checkpoint's through the renamings ``from_pretrained`` applies. For the input capture only the small
modules outside the decoder blocks are loaded, and of the input embedding only the rows of the calibration tokens
(a forward through a memory-mapped embedding would page most of it in). Then, for each block in order, its tensors
are read from the source shards with safetensors' lazy ``safe_open`` and placed with accelerate's
``set_module_tensor_to_device`` on the execution device; the block is calibrated, pruned and propagated by the same
code as the in-memory driver (so the result is bitwise identical), written to its own output shard and returned to
``meta``. The non-block modules are loaded again only to be written, at the end, so while the blocks are pruned peak
memory is one block + the calibration activations + the Gram statistics + one layer's solver workspace (for
Wanda and magnitude, which zero weights in place, a one-byte-per-weight mask).

The output directory (one shard per block plus one for the rest, an index, the config, tokenizer files and
``pruning_config.json``) is written beside ``save_dir`` and renamed into place when complete; the source is only read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import resume
from .activations import check_activation_storage, resolve_storage, stash
from .calibration import CalibrationSource, describe_source, get_calibration_data
from .configuration import PruningConfig
from .export import PRUNING_CONFIG_NAME, check_save_dir, pruning_metadata, staged_directory
from .memory import MaxMemory, release_freed_host_memory
from .modeling import find_decoder_blocks, find_prunable_layers
from .registry import get_method
from .reporting import PruningReport
from .sequential import _capture_inputs, _prune_block

__all__ = ["StreamingResult", "prune_checkpoint", "checkpoint_weight_map"]

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
        raise ValueError(
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

    def open(self, key: str, device: torch.device | str = "cpu") -> Any:
        from safetensors import safe_open

        return safe_open(str(self.directory / self.files[key]), framework="pt", device=str(device))


def _model_names(model: nn.Module, stored_names: list[str]) -> dict[str, str]:
    """``{model tensor name: stored name}`` through the renamings ``from_pretrained`` applies to checkpoint keys
    (GPT-NeoX's ``embed_out`` is the model's ``lm_head``, legacy ``gamma``/``beta``, a missing or extra base-model
    prefix). A tensor that transformers merges or splits on load cannot be streamed as stored: refused."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # a transformers without load-time conversions: the stored names are the model's
        return {name: name for name in stored_names}
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    names = {}
    for stored in stored_names:
        name, converted = rename_source_key(stored, renamings, converters, model.base_model_prefix, meta_state)
        if converted is not None:
            raise ValueError(
                f"source tensor {stored!r} is invalid for streaming mode; allowed: tensors loaded as stored "
                f"(transformers converts it on load with pattern {converted!r}); prune the loaded model instead"
            )
        names[name] = stored
    return names


def _load_tensors(model: nn.Module, checkpoint: _Checkpoint, names: list[str], device, page_in: bool = True) -> float:
    """Read ``names`` from the shards onto ``device`` into the skeleton; returns the seconds spent.

    ``page_in=False`` leaves CPU tensors mapped lazily (modules a forward may not read, such as an untied head).
    """
    from accelerate.utils import set_module_tensor_to_device

    start = time.perf_counter()
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(checkpoint.files[name], []).append(name)
    for keys in by_file.values():
        with checkpoint.open(keys[0], device) as handle:
            for key in keys:
                value = handle.get_tensor(checkpoint.stored[key])
                if page_in and value.device.type == "cpu":
                    _page_in(value)
                set_module_tensor_to_device(model, key, device, value=value)
    return time.perf_counter() - start


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


def _write_shard(model: nn.Module, names: list[str], path: Path) -> float:
    from safetensors.torch import save_file

    start = time.perf_counter()
    save_file(_block_tensors(model, names), str(path), metadata={"format": "pt"})
    return time.perf_counter() - start


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
    stored = _model_names(model, list(weight_map))
    unknown = sorted(stored[name] for name in set(stored) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"source={str(source)!r} holds tensors the model does not name: {unknown[:5]}")
    files = {name: weight_map[stored_name] for name, stored_name in stored.items()}
    return model.eval(), _Checkpoint(source, files, stored)


def _sequence_length(model: nn.Module, requested: int) -> int:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(requested, limit) if isinstance(limit, int) and limit > 0 else requested


def prune_checkpoint(
    source: str | os.PathLike,
    save_dir: str | os.PathLike,
    config: PruningConfig,
    calibration_dataset: CalibrationSource | None = None,
    tokenizer: Any = None,
    *,
    execution_device: torch.device | str = "cpu",
    storage_device: torch.device | str = "cpu",
    max_memory: MaxMemory | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    activation_cache_dir: str | os.PathLike | None = None,
) -> StreamingResult:
    """Prune the checkpoint in ``source`` block by block into ``save_dir``, holding one block at a time.

    Args:
        source: a local directory with safetensors weights (sharded or not) and ``config.json``; only read.
        save_dir: the output directory (loads with ``AutoModelForCausalLM.from_pretrained``).
        config: the pruning recipe.
        calibration_dataset: as for :meth:`ADMMPruner.prune`; not needed by methods that use no calibration data.
        tokenizer: tokenizer for text calibration data (default: loaded from ``source``).
        execution_device: where each block is loaded and computed.
        storage_device: where the calibration activations wait between blocks.
        max_memory: activation budget on ``storage_device`` (see :func:`optimum_admm.memory.check_activation_budget`).
        overwrite: replace a non-empty ``save_dir``.
        show_progress: show a tqdm bar over the blocks.
        checkpoint_dir: record each finished block there (its output shard and the next block's inputs) and, when
            it already holds a run of the same recipe, checkpoint and data, continue from the next block; see
            :mod:`optimum_admm.resume`. The output is still only renamed into ``save_dir`` when complete.
        activation_cache_dir: keep the calibration activations in memory-mapped files there instead of on
            ``storage_device`` (see :mod:`optimum_admm.activations`).

    Example:
        >>> from optimum_admm import ADMMConfig
        >>> result = prune_checkpoint("llama-7b", "llama-7b-admm", ADMMConfig(), "wikitext2",  # doctest: +SKIP
        ...     execution_device="cuda:0")
        >>> result.load_seconds, result.compute_seconds, result.write_seconds  # doctest: +SKIP
    """
    started = time.perf_counter()
    source, target = Path(source), check_save_dir(save_dir, overwrite)
    weight_map = checkpoint_weight_map(source)
    device, storage = torch.device(execution_device), resolve_storage(storage_device, activation_cache_dir)
    method = get_method(config)
    model, checkpoint = _skeleton(source, weight_map)
    weight_map = checkpoint.files
    blocks_name, blocks = find_decoder_blocks(model)
    layers_per_block = find_prunable_layers(
        model, config.targets, config.ignore, blocks, blocks_name, default_targets=type(config)().targets
    )
    block_keys = [sorted(k for k in weight_map if k.startswith(f"{blocks_name}.{i}.")) for i in range(len(blocks))]
    other_keys = sorted(set(weight_map) - {k for keys in block_keys for k in keys})
    batches, calibration = None, {}
    if config.needs_calibration:
        if calibration_dataset is None:
            raise ValueError(f"calibration_dataset=None is invalid for method {config.method!r}")
        if tokenizer is None and not isinstance(calibration_dataset, torch.Tensor):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
        length = _sequence_length(model, config.sequence_length)
        ids = get_calibration_data(calibration_dataset, tokenizer, config.num_samples, length, seed=config.seed)
        check_activation_storage(model, int(ids.shape[0]), int(ids.shape[1]), max_memory, storage)
        batches = list(ids.split(1))
        calibration = {"dataset": describe_source(calibration_dataset), "num_samples": int(ids.shape[0])}
        calibration.update({"sequence_length": int(ids.shape[1]), "seed": config.seed})

    result = StreamingResult(report=None, save_dir=target)
    report = PruningReport(method=config.method, config=config.to_dict(), calibration=calibration)
    timings = {"forward": 0.0, "statistics": 0.0, "solve": 0.0}
    total = len(blocks) + 1
    embedding_key = _input_embedding_key(model, weight_map)
    with staged_directory(target) as tmp:
        # Only the capture reads modules outside the blocks, and of the input embedding only the rows of the
        # calibration tokens (see _embedding_rows); without calibration data nothing is loaded before the blocks.
        early_keys = [k for k in other_keys if k != embedding_key] if batches is not None else []
        result.load_seconds += _load_tensors(model, checkpoint, early_keys, device, page_in=False)
        model.tie_weights()
        state, first = None, 0
        if checkpoint_dir is not None:
            current = resume.fingerprint(model, report.config, batches)
            current["source"] = _source_digest(checkpoint, embedding_key)
            state = resume.load_state(checkpoint_dir, current) or resume.CheckpointState(current, 0)
            first = state.next_block
            report.layers = list(state.layers)
            for index in range(first):  # blocks finished before the interruption: their shards as recorded
                _link_or_copy(resume.block_path(checkpoint_dir, index), tmp / _shard_name(index, total))
                result.shards.append(_shard_name(index, total))
        unpruned: list[str] = []
        with torch.no_grad():
            inputs = None
            if batches is not None and first < len(blocks):
                start = time.perf_counter()
                capture = batches if first == 0 else batches[:1]  # on resume: only the blocks' other arguments
                embed = None
                if embedding_key is not None:
                    embed, seconds = _embedding_rows(model, checkpoint, embedding_key, capture, device)
                    result.load_seconds += seconds
                inputs = _capture_with_streamed_blocks(
                    model, blocks, block_keys, capture, checkpoint, device, storage, result, embed
                )
                del embed
                if first:
                    inputs.hidden = [stash(h, storage) for h in resume.load_inputs(checkpoint_dir, first)]
                result.compute_seconds += time.perf_counter() - start
            # The embeddings, final norm and head are not needed again until they are written: hold one block only.
            _free(model, early_keys)
            model.tie_weights()
            bar = tqdm(
                range(first, len(blocks)),
                desc=f"Streaming ({config.method})",
                unit="block",
                disable=not show_progress,
            )
            for index in bar:
                result.load_seconds += _load_tensors(model, checkpoint, block_keys[index], device)
                start = time.perf_counter()
                _prune_block(
                    model,
                    blocks[index],
                    layers_per_block[index],
                    inputs,
                    index,
                    config,
                    method,
                    report,
                    timings,
                    unpruned,
                )
                result.compute_seconds += time.perf_counter() - start
                shard = _shard_name(index, total)
                start = time.perf_counter()
                if state is not None and not unpruned:
                    state.layers = report.layers
                    hidden = inputs.hidden if inputs is not None and index + 1 < len(blocks) else None
                    tensors = _block_tensors(model, block_keys[index])
                    resume.save_block(checkpoint_dir, index, tensors, hidden, state)
                    del tensors
                    _link_or_copy(resume.block_path(checkpoint_dir, index), tmp / shard)
                    result.write_seconds += time.perf_counter() - start
                else:
                    result.write_seconds += _write_shard(model, block_keys[index], tmp / shard)
                result.shards.append(shard)
                _free(model, block_keys[index])
                release_freed_host_memory()
        if unpruned:
            raise RuntimeError(f"{len(unpruned)} targeted layers received no calibration input: {unpruned[:5]}")
        result.write_seconds += _write_rest(
            model, checkpoint, tmp, other_keys, block_keys, result, total, config, report
        )
    report.forward_seconds = timings["forward"] - timings["statistics"]
    report.statistics_seconds, report.solve_seconds = timings["statistics"], timings["solve"]
    report.total_seconds = time.perf_counter() - started
    result.report = report
    logger.info(
        "streamed %d blocks: load %.1fs, compute %.1fs, write %.1fs",
        len(blocks),
        result.load_seconds,
        result.compute_seconds,
        result.write_seconds,
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
    Returns the function and the seconds spent reading.
    """
    start = time.perf_counter()
    module = model.get_input_embeddings()
    rows = torch.unique(torch.cat([batch.reshape(-1) for batch in batches]))  # sorted
    with checkpoint.open(key) as handle:
        view = handle.get_slice(checkpoint.stored[key])
        vocabulary = int(view.get_shape()[0])
        if int(rows[0]) < 0 or int(rows[-1]) >= vocabulary:
            bad = int(rows[0]) if int(rows[0]) < 0 else int(rows[-1])
            raise ValueError(f"calibration token id {bad} is invalid; allowed: 0 to {vocabulary - 1} (the vocabulary)")
        compact = torch.cat([view[a:b] for a, b in _row_runs(rows.tolist())])
    compact = nn.Parameter(compact.to(device=device, dtype=module.weight.dtype), requires_grad=False)

    def embed(batch: torch.Tensor) -> torch.Tensor:
        saved = module._parameters["weight"]
        module._parameters["weight"] = compact
        try:
            return module(torch.searchsorted(rows, batch).to(device))
        finally:
            module._parameters["weight"] = saved

    return embed, time.perf_counter() - start


def _capture_with_streamed_blocks(model, blocks, block_keys, batches, checkpoint, device, storage, result, embed=None):
    """The driver's input capture, with each block loaded just before its forward and freed just after."""

    def load(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if all(p.device.type != "meta" for p in module.parameters()):
                return  # still loaded: the capture stopped this block's forward on an earlier batch
            result.load_seconds += _load_tensors(model, checkpoint, block_keys[index], device)

        return hook

    def free(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            _free(model, block_keys[index])
            release_freed_host_memory()  # the block's forward temporaries, before the next block is read

        return hook

    handles = [b.register_forward_pre_hook(load(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(free(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        return _capture_inputs(model, blocks, batches, storage, embed)
    finally:
        for handle in handles:
            handle.remove()
        for keys in block_keys:  # a block whose forward was stopped by the capture hook
            with contextlib.suppress(Exception):
                _free(model, keys)


def _write_rest(model, checkpoint, tmp, other_keys, block_keys, result, total, config, report) -> float:
    """The non-block shard, the index, config/tokenizer files and ``pruning_config.json``."""
    first = f"model-00001-of-{total:05d}.safetensors"
    result.load_seconds += _load_tensors(model, checkpoint, other_keys, "cpu")
    seconds = _write_shard(model, other_keys, tmp / first)
    _free(model, other_keys)
    weight_map = dict.fromkeys(other_keys, first)
    for shard, keys in zip(result.shards, block_keys, strict=True):
        weight_map.update(dict.fromkeys(keys, shard))
    size = sum((tmp / f).stat().st_size for f in [first, *result.shards])
    (tmp / _INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    for path in checkpoint.directory.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != _INDEX:
            shutil.copy2(path, tmp / path.name)
    metadata = pruning_metadata(config, report)
    (tmp / PRUNING_CONFIG_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
    return seconds
