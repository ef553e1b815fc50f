"""The block-by-block driver: the one place that owns hooks, devices and progress.

For each decoder block in order: run the dense block on every calibration sample with hooks that accumulate one
Gram matrix per distinct input (q/k/v share one, gate/up share one), prune every targeted linear with the method the
registry gives for the config, then run the pruned block again to produce the next block's inputs. Block inputs are
captured generically: a pre-hook records the hidden states and every keyword argument each block receives (masks,
position ids, rotary ``position_embeddings``, cache position), so no architecture is named here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import resume
from .activations import Storage, check_activation_storage, resolve_storage, stash
from .configuration import PruningConfig
from .masks import row_chunks
from .memory import MaxMemory, release_freed_host_memory
from .modeling import execution_device, find_decoder_blocks, find_prunable_layers, get_weight_matrix, set_weight_matrix
from .offload import onloaded
from .registry import get_mask_method, get_method
from .reporting import LayerReport, PruningReport
from .stats import GramAccumulator, masked_reconstruction_error, relative_reconstruction_error

__all__ = ["prune_model"]

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook to end a model forward once the first block's inputs are recorded."""


@dataclass
class _BlockInputs:
    hidden: list[torch.Tensor]  # one (batch, seq, hidden) tensor per calibration batch, kept in `storage`
    # per block: the other positional and the keyword arguments it receives (the same for every sample)
    arguments: list[tuple[tuple[Any, ...], dict[str, Any]]]
    storage: Storage = torch.device("cpu")  # where block outputs are kept for the next block


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    """Whether two blocks' arguments agree. Floating tensors (rotary tables) are recomputed for every sample, and a
    multithreaded BLAS may round them differently from one call to the next: they agree within float tolerance."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.device != b.device or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _model_input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return execution_device(embeddings)
    return execution_device(model)


def _capture_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    storage: Storage,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> _BlockInputs:
    """Record the first block's hidden states for every batch and each block's keyword arguments.

    The first batch runs through every (dense) block so that every block's own arguments are seen (models such
    as Gemma 3 give sliding-window and global layers different masks and rotary tables) and stops after the last
    one; the other batches stop at the first block. Keyword arguments must not depend on the sample, which holds
    for unpadded windows. ``embed``, when given, turns a batch of token ids into the ``inputs_embeds`` the model is
    called with (streaming mode embeds with only the embedding rows the calibration tokens use).
    """
    hidden: list[torch.Tensor] = []
    arguments: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * len(blocks)
    state = {"full": True}

    def make_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            hidden_states = args[0] if args else kwargs.pop("hidden_states")
            received = (tuple(args[1:]), kwargs)
            if index == 0:
                hidden.append(stash(hidden_states, storage))
            if state["full"]:
                arguments[index] = received
            elif not _same(received, arguments[0]):
                raise RuntimeError(
                    "the first decoder block received different keyword arguments for different calibration "
                    "samples; optimum-admm needs sample-independent masks and positions (unpadded windows)"
                )
            if not state["full"]:
                raise _StopForward

        return hook

    def stop_after_last_block(module: nn.Module, args: tuple, output: Any) -> None:
        raise _StopForward  # the final norm and the head are not needed (and a tied head reads the whole embedding)

    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(stop_after_last_block))
    device = _model_input_device(model)
    try:
        for index, batch in enumerate(batches):
            state["full"] = index == 0
            with contextlib.suppress(_StopForward):
                if embed is None:
                    model(input_ids=batch.to(device), use_cache=False)
                else:
                    model(inputs_embeds=embed(batch), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, received in enumerate(arguments) if received is None]
    if missing:
        raise RuntimeError(f"decoder blocks {missing} were never called during the model forward")
    return _BlockInputs(hidden=hidden, arguments=arguments, storage=storage)  # type: ignore[arg-type]


def _run_block(block: nn.Module, inputs: _BlockInputs, index: int, device: torch.device, storage: Storage):
    args, kwargs = _to_device(inputs.arguments[index], device)
    for hidden in inputs.hidden:  # one calibration batch at a time on the execution device
        yield stash(_first_output(block(hidden.to(device), *args, **kwargs)), storage)


def _share_groups(block: nn.Module, layers: dict[str, nn.Module], inputs: _BlockInputs, index: int, device):
    """Group the block's layers by shared input, in execution order, from one probe forward on the first batch."""
    seen: list[tuple[str, torch.Tensor]] = []
    names = {module: name for name, module in layers.items()}

    def hook(module: nn.Module, args: tuple) -> None:
        seen.append((names[module], args[0]))

    handles = [m.register_forward_pre_hook(hook) for m in layers.values()]
    try:
        probe = _BlockInputs(hidden=inputs.hidden[:1], arguments=inputs.arguments)
        for _ in _run_block(block, probe, index, device, device):
            pass
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    group_inputs: list[torch.Tensor] = []
    assigned: set[str] = set()
    for name, tensor in seen:
        if name in assigned:
            continue
        assigned.add(name)
        for group, group_input in zip(groups, group_inputs, strict=False):
            if group_input is tensor:
                group.append(name)
                break
        else:
            groups.append([name])
            group_inputs.append(tensor)
    groups.extend([name] for name in layers if name not in assigned)  # never called on the probe batch
    return groups


def _accumulate_grams(block, layers, groups, inputs, index, device, timings) -> dict[str, GramAccumulator]:
    """Run the block on every batch; one Gram per group, filled by a hook on the group's first layer."""
    accumulators: dict[str, GramAccumulator] = {}
    handles = []
    for group in groups:
        leader = layers[group[0]]
        accumulator = GramAccumulator(get_weight_matrix(leader).shape[1], device=device)
        for name in group:
            accumulators[name] = accumulator

        def hook(module: nn.Module, args: tuple, acc: GramAccumulator = accumulator) -> None:
            start = time.perf_counter()
            acc.add(args[0])
            timings["statistics"] += time.perf_counter() - start

        handles.append(leader.register_forward_pre_hook(hook))
    start = time.perf_counter()
    try:
        for _ in _run_block(block, inputs, index, device, device):
            pass
    finally:
        for handle in handles:
            handle.remove()
    timings["forward"] += time.perf_counter() - start
    return accumulators


def _prune_layer(name: str, module: nn.Module, gram: torch.Tensor | None, config, method) -> LayerReport:
    start = time.perf_counter()
    dense = get_weight_matrix(module)
    mask_method = get_mask_method(config)
    if mask_method is not None:
        # A method that only removes weights: zero them in place, a chunk of rows at a time (no pruned copy).
        keep = mask_method(dense, gram, config)
        error = None if gram is None else masked_reconstruction_error(dense, keep, gram)
        for rows in row_chunks(dense):
            dense[rows].masked_fill_(~keep[rows], 0)
        del keep
    else:
        pruned = method(dense, gram, config)
        error = None if gram is None else relative_reconstruction_error(dense, pruned, gram)
        set_weight_matrix(module, pruned)
        del pruned
    if dense.is_cuda:
        torch.cuda.synchronize(dense.device)
    seconds = time.perf_counter() - start
    sparsity = 1.0 - float(torch.count_nonzero(get_weight_matrix(module))) / dense.numel()
    return LayerReport(name, tuple(dense.shape), sparsity, error, seconds)


def _prune_block(model, block, layers, inputs, index, config, method, report, timings, unpruned) -> None:
    """Calibrate, prune and (when there are inputs) propagate one block; offloaded weights are written back."""
    device = execution_device(block)
    if inputs is None:
        for name in layers:
            with onloaded(model, name) as module:
                report.layers.append(_prune_layer(name, module, None, config, method))
        return
    groups = _share_groups(block, layers, inputs, index, device)
    release_freed_host_memory()  # the probe forward's temporaries, before the Grams are allocated
    stages = groups if config.true_sequential else [[n for g in groups for n in g]]
    for stage in stages:
        stage_groups = [g for g in groups if g[0] in stage]
        grams = _accumulate_grams(block, layers, stage_groups, inputs, index, device, timings)
        release_freed_host_memory()  # the forwards' temporaries, before the solves allocate theirs
        for name in stage:
            # The dict holds the only references: a group's Gram is freed once its last layer is pruned.
            accumulator = grams.pop(name)
            if accumulator.num_tokens == 0:
                unpruned.append(name)
                continue
            with onloaded(model, name) as module:
                row = _prune_layer(name, module, accumulator.gram, config, method)
            row.num_tokens = accumulator.num_tokens
            on_cpu = accumulator.gram.device.type == "cpu"
            del accumulator
            if on_cpu:
                release_freed_host_memory()
            report.layers.append(row)
            timings["solve"] += row.seconds
    start = time.perf_counter()
    inputs.hidden = list(_run_block(block, inputs, index, device, inputs.storage))
    timings["forward"] += time.perf_counter() - start
    release_freed_host_memory()


def _pruned_tensors(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in layers:
        with onloaded(model, name, write_back=False) as module:
            tensors[f"{name}.weight"] = module.weight.detach().to("cpu", copy=True)
    return tensors


def _restore_blocks(model: nn.Module, checkpoint_dir, layers_per_block, next_block: int) -> None:
    for index in range(next_block):
        saved = resume.load_block(checkpoint_dir, index)
        for name in layers_per_block[index]:
            with onloaded(model, name) as module:
                module.weight.data.copy_(saved[f"{name}.weight"].to(module.weight.device))


def prune_model(
    model: nn.Module,
    config: PruningConfig,
    calibration_batches: list[torch.Tensor] | None,
    storage_device: torch.device | str = "cpu",
    show_progress: bool = True,
    *,
    max_memory: MaxMemory | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    activation_cache_dir: str | os.PathLike | None = None,
) -> PruningReport:
    """Prune ``model`` in place, block by block, with the method registered for ``config``.

    Offloaded blocks of a model dispatched by accelerate (CPU or disk offload) are pruned through their hooks' weights
    map, so later forwards see the pruned weights.

    Args:
        model: a causal LM (``PreTrainedModel``) on any device, or spread by an accelerate device map.
        config: the pruning recipe.
        calibration_batches: ``(batch, sequence_length)`` token-id tensors; ``None`` for methods that need none.
        storage_device: where block inputs wait between blocks (``"cpu"`` keeps them off the accelerator).
        show_progress: show a tqdm bar over the blocks.
        max_memory: budget for the calibration activations on ``storage_device`` (bytes, ``"8GiB"`` or accelerate's
            ``{device: size}`` dict); refused with the numbers before any forward when too small.
        checkpoint_dir: record each finished block there and, when it already holds a run of the same recipe, model
            and data, continue from the next block (see :mod:`optimum_admm.resume`).
        activation_cache_dir: keep the calibration activations in memory-mapped files there instead of on
            ``storage_device``, for calibration sets larger than RAM (see :mod:`optimum_admm.activations`).

    Returns:
        The :class:`~optimum_admm.reporting.PruningReport`.

    Example:
        >>> report = prune_model(model, ADMMConfig(), batches, checkpoint_dir="ckpt")  # doctest: +SKIP
    """
    started = time.perf_counter()
    blocks_name, blocks = find_decoder_blocks(model)
    layers_per_block = find_prunable_layers(
        model, config.targets, config.ignore, blocks, blocks_name, default_targets=type(config)().targets
    )
    method = get_method(config)
    storage = resolve_storage(storage_device, activation_cache_dir)
    timings = {"forward": 0.0, "statistics": 0.0, "solve": 0.0}
    report = PruningReport(method=config.method, config=config.to_dict())
    if config.needs_calibration and calibration_batches:
        num_samples = sum(int(b.shape[0]) for b in calibration_batches)
        check_activation_storage(model, num_samples, int(calibration_batches[0].shape[1]), max_memory, storage)
    state = None
    if checkpoint_dir is not None:
        current = resume.fingerprint(model, report.config, calibration_batches)
        state = resume.load_state(checkpoint_dir, current) or resume.CheckpointState(current, 0)
    first = 0 if state is None else state.next_block
    unpruned: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = None
            if config.needs_calibration:
                if not calibration_batches:
                    raise ValueError(f"method {config.method!r} needs calibration_batches; got none")
                start = time.perf_counter()
                capture = calibration_batches if first == 0 else calibration_batches[:1]
                inputs = _capture_inputs(model, blocks, capture, storage)
                timings["forward"] += time.perf_counter() - start
            if first:
                _restore_blocks(model, checkpoint_dir, layers_per_block, first)
                report.layers = list(state.layers)
                if inputs is not None and first < len(blocks):
                    inputs.hidden = [stash(h, storage) for h in resume.load_inputs(checkpoint_dir, first)]
            bar = tqdm(
                range(first, len(blocks)), desc=f"Pruning ({config.method})", unit="block", disable=not show_progress
            )
            for index in bar:
                layers = layers_per_block[index]
                _prune_block(model, blocks[index], layers, inputs, index, config, method, report, timings, unpruned)
                errors = [r.relative_error for r in report.layers[-len(layers) :] if r.relative_error is not None]
                if errors:
                    bar.set_postfix(mean_rel_error=f"{sum(errors) / len(errors):.2e}")
                    logger.info("block %d: mean relative error %.3e", index, sum(errors) / len(errors))
                if state is not None and not unpruned:
                    state.layers = report.layers
                    hidden = inputs.hidden if inputs is not None and index + 1 < len(blocks) else None
                    resume.save_block(checkpoint_dir, index, _pruned_tensors(model, layers), hidden, state)
    finally:
        model.train(was_training)
    if unpruned:
        raise RuntimeError(
            f"{len(unpruned)} targeted layers received no calibration input and were left dense: {unpruned[:5]}; "
            "add them to `ignore` or use more calibration samples"
        )
    if not config.needs_calibration:
        timings["solve"] = sum(r.seconds for r in report.layers)
    report.forward_seconds = timings["forward"] - timings["statistics"]
    report.statistics_seconds = timings["statistics"]
    report.solve_seconds = timings["solve"]
    report.total_seconds = time.perf_counter() - started
    return report
