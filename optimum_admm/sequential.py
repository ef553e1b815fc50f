"""The block-by-block driver: the one block loop, the one place that owns hooks, devices, progress and resume.

For each decoder block in order: load it through the run's weight store, run the dense block on every calibration
sample with hooks that accumulate the statistic the method declared, once per distinct input (q/k/v share one,
gate/up share one), prune every targeted linear with the method the registry gives for the config, then run the
pruned block again to produce the next block's inputs, record it (resume) and release it. Block inputs are
captured generically: a pre-hook records the hidden states and every keyword argument each block receives (masks,
position ids, rotary ``position_embeddings``, cache position), so no architecture is named here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import tqdm  # honours the global switches (HF_HUB_DISABLE_PROGRESS_BARS, transformers')
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from . import allocation, resume
from .activations import Storage, check_activation_storage, resolve_storage, stash
from .configuration import PruningConfig, default_of
from .distributed import Distributed, assign_layers
from .distributed import current as current_group
from .errors import InvalidArgumentError, NonFiniteWeightsError, UnprunedLayersError
from .experts import ExpertMatrix, ExpertSet, find_experts, routed_calibration
from .masks import row_chunks
from .memory import ActivationMemory, release_freed_host_memory
from .modeling import (
    dense_block_parameters,
    dense_outside_blocks,
    execution_device,
    find_decoder_blocks,
    find_prunable_layers,
    get_weight_matrix,
    language_model,
    matches,
    set_weight_matrix,
    towers,
)
from .registry import MethodSpec, get_spec
from .reporting import LayerReport, PhaseTimer, PruningReport
from .stats import (
    GramAccumulator,
    InputNormAccumulator,
    StatisticAccumulator,
    masked_reconstruction_error,
    relative_reconstruction_error,
)
from .stores import InMemoryStore, WeightStore, input_device, store_for

__all__ = ["prune_model"]

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook to end a model forward once the first block's inputs are recorded."""


@dataclass
class _BlockInputs:
    hidden: list[torch.Tensor]  # one (batch, seq, hidden) tensor per calibration batch, kept in `storage`
    # per block: the other positional and the keyword arguments it receives for the first sample
    arguments: list[tuple[tuple[Any, ...], dict[str, Any]]]
    storage: Storage = torch.device("cpu")  # where block outputs are kept for the next block
    #: per block and sample, when some argument depends on the sample (Gemma 4's per-layer inputs, DeepSeek-V4's
    #: token ids for hash routing): the arguments, sharing every value that equals the first sample's
    per_sample: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] | None = None
    #: targeted layers the first sample's dense forward never called (weights read functionally, cross-attention)
    uncalled: list[str] = field(default_factory=list)

    def of(self, index: int, sample: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Block ``index``'s arguments for calibration sample ``sample``."""
        return self.arguments[index] if self.per_sample is None else self.per_sample[index][sample]


@dataclass
class _Run:
    """What one prune carries from block to block."""

    model: nn.Module
    config: PruningConfig
    spec: MethodSpec
    store: WeightStore
    blocks: nn.ModuleList
    layers_per_block: list[dict[str, nn.Module]]
    report: PruningReport
    timer: PhaseTimer
    checkpoint_dir: Path | None = None
    state: resume.CheckpointState | None = None
    unpruned: list[str] = field(default_factory=list)
    dist: Distributed = field(default_factory=Distributed)
    num_samples: int = 0  # calibration samples over all ranks
    show_progress: bool = False
    #: the targeted linears of every block, by full name
    layers: dict[str, nn.Module] = field(default_factory=dict)
    #: the fused experts modules of every block (run through their per-expert matrices while calibrating)
    experts: list[list[ExpertSet]] = field(default_factory=list)
    #: per-layer target sparsities where they differ from the config's (``sparsity_map``, OWL)
    targets: dict[str, float] = field(default_factory=dict)


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
    if isinstance(a, Mapping) and isinstance(b, Mapping):  # dicts, and mappings such as a ModelOutput
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def check_causal(model: nn.Module) -> None:
    """Refuse a model whose output at a position depends on later tokens (a bidirectional encoder such as
    ``BertModel``, or a BERT checkpoint loaded as ``BertLMHeadModel``): two sequences that differ only in their last
    token must give the same outputs before it. One forward of 2 x 4 tokens; nothing is named per architecture.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> check_causal(BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=32, vocab_size=20)))
        Traceback (most recent call last):
        ...
        optimum_admm.errors.InvalidArgumentError: model=BertModel is not a causal language model: ...
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 6:
        return
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]], device=input_device(model))
    try:
        output = model(input_ids=ids, use_cache=False)  # hybrid caches (Jamba, Qwen3-Next) need a full forward
    except TypeError:  # a model that takes no input_ids: calibration will say what it needs
        return
    output = output.to_tuple()[0] if hasattr(output, "to_tuple") else _first_output(output)  # logits / hidden
    if not isinstance(output, torch.Tensor) or output.dim() < 2 or output.shape[:2] != (2, 4):
        return
    if not bool(torch.isfinite(output).all()):  # non-finite weights: the finite-weight check names them
        return
    if not torch.allclose(output[0, :3].float(), output[1, :3].float(), rtol=1e-3, atol=1e-4):
        raise InvalidArgumentError(
            f"model={type(model).__name__} is not a causal language model: its output at a position changes with "
            "later tokens (bidirectional attention, as in BERT-style encoders, or an encoder checkpoint loaded with "
            "a new LM head); allowed: a causal LM (what AutoModelForCausalLM loads from a decoder checkpoint)"
        )


def check_finite_weights(store: WeightStore, index: int) -> None:
    """Refuse a block with NaN or infinite parameters, naming the tensor (pruning would pass them on or rank them
    arbitrarily)."""
    for owner, _ in store.parameter_owners(index):
        with store.module(owner, write=False) as module:  # checked where the weights are: no copy to the host
            found = [
                (f"{owner}.{local}", int((~torch.isfinite(p)).sum()))
                for local, p in module.named_parameters(recurse=False)
                if p.is_floating_point() and not bool(torch.isfinite(p).all())
            ]
        if found:
            name, bad = found[0]
            raise NonFiniteWeightsError(
                f"weight {name} holds {bad} NaN or infinite values; allowed: finite weights. The checkpoint is "
                "damaged or was saved from a diverged run: reload it, or load it in a wider dtype (dtype=torch.float32)"
            )


def _check_finite_inputs(hidden_states: torch.Tensor, sample: int) -> None:
    if hidden_states.is_floating_point() and not bool(torch.isfinite(hidden_states).all()):
        raise NonFiniteWeightsError(
            f"the calibration activations entering the first decoder block hold NaN or infinite values (sample "
            f"{sample}); allowed: finite values. Check the input embedding for NaN and the calibration token ids"
        )


def _safe_same(a: Any, b: Any) -> bool:
    try:
        return _same(a, b)
    except Exception:  # a value whose comparison raises (a mapping of caches filled during the forward): differs
        return False


def _sharing(received: tuple[tuple[Any, ...], dict[str, Any]], first: tuple[tuple[Any, ...], dict[str, Any]]):
    """``received`` with every value equal to the first sample's replaced by that value (one copy in memory)."""
    shared = first[0]
    args = tuple(shared[i] if i < len(shared) and _safe_same(a, shared[i]) else a for i, a in enumerate(received[0]))
    kwargs = {k: first[1][k] if k in first[1] and _safe_same(v, first[1][k]) else v for k, v in received[1].items()}
    return args, kwargs


class _Capture:
    """The pre- and post-forward hooks of the input capture on every block, and what they record."""

    def __init__(self, blocks: nn.ModuleList, storage: Storage, store: WeightStore) -> None:
        self.blocks, self.storage, self.store = blocks, storage, store
        self.hidden: list[torch.Tensor] = []
        self.arguments: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * len(blocks)
        self.per_sample: list[list[Any]] = [[] for _ in blocks]
        self.full, self.replay, self.dependent = True, False, False

    def before(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            hidden_states = args[0] if args else kwargs.pop("hidden_states")
            received = (tuple(args[1:]), kwargs)
            if index == 0 and not self.replay:
                _check_finite_inputs(hidden_states, len(self.hidden))
                self.hidden.append(stash(hidden_states, self.storage))
            if self.replay:  # a later sample through every block: its own arguments, sharing the first's
                self.per_sample[index].append(_sharing(received, self.arguments[index]))
            elif not self.full:
                self.dependent = self.dependent or not _safe_same(received, self.arguments[0])
                raise _StopForward
            else:
                self.arguments[index] = received
                self.per_sample[index].append(received)
            self.store.load_block(index)
            if not self.store.resident:  # a streamed block is checked as it is read, before its forward
                check_finite_weights(self.store, index)

        return hook

    def after(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.store.release_block(index)
            if index == len(self.blocks) - 1:
                raise _StopForward  # the final norm and the head are not needed (a tied head reads the embedding)

        return hook


def _capture_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    storage: Storage,
    store: WeightStore | None = None,
    layers: dict[str, nn.Module] | None = None,
) -> _BlockInputs:
    """Record the first block's hidden states for every batch and each block's other arguments.

    The first batch runs through every (dense) block so that every block's own arguments are seen (models such
    as Gemma 3 give sliding-window and global layers different masks and rotary tables) and stops after the last
    one; the other batches stop at the first block. When the first block's arguments differ from one sample to the
    next (per-layer inputs, token ids for hash routing, caches filled during the forward), every other batch also
    runs through every dense block and each block's arguments are kept per sample (values equal to the first
    sample's are shared). The store loads each block just before its forward and releases it just after (streaming
    holds one block at a time) and may embed the tokens itself (streaming reads only the embedding rows they use).
    """
    if store is None:
        store = InMemoryStore(model)
        store.bind(find_decoder_blocks(model)[0], blocks)
    capture = _Capture(blocks, storage, store)
    handles = [block.register_forward_pre_hook(capture.before(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles += [block.register_forward_hook(capture.after(i)) for i, block in enumerate(blocks)]
    called: set[int] = set()  # which targeted layers the first (full) sample reaches; experts are routed, not called
    watched = {n: m for n, m in (layers or {}).items() if not isinstance(m, ExpertMatrix)}
    handles += [m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))) for m in watched.values()]
    device = input_device(model)
    try:
        embed = store.prepare_capture(batches)

        def forward(batch: torch.Tensor) -> None:
            with contextlib.suppress(_StopForward):
                if embed is None:
                    model(input_ids=batch.to(device), use_cache=False)
                else:
                    model(inputs_embeds=embed(batch), use_cache=False)

        for index, batch in enumerate(batches):
            capture.full = index == 0
            forward(batch)
        if capture.dependent:
            logger.info("block arguments depend on the calibration sample: recording them per sample")
            capture.replay = True
            for batch in batches[1:]:
                forward(batch)
    finally:
        for handle in handles:
            handle.remove()
        for index in range(len(blocks)):  # a block whose forward an error stopped
            store.release_block(index)
        store.end_capture()
    missing = [i for i, received in enumerate(capture.arguments) if received is None]
    if missing:
        raise InvalidArgumentError(
            f"decoder blocks {missing} of {type(model).__name__} were never called by a forward of input_ids alone; "
            "allowed: a causal LM whose decoder runs on token ids (a model that needs pixel values or encoder "
            "outputs for its decoder is not supported)"
        )
    inputs = _BlockInputs(hidden=capture.hidden, arguments=capture.arguments, storage=storage)  # type: ignore[arg-type]
    inputs.per_sample = capture.per_sample if capture.dependent else None
    inputs.uncalled = [n for n, m in watched.items() if id(m) not in called]
    return inputs


def _run_block(block: nn.Module, inputs: _BlockInputs, index: int, device: torch.device, storage: Storage):
    for sample, hidden in enumerate(inputs.hidden):  # one calibration batch at a time on the execution device
        args, kwargs = _to_device(inputs.of(index, sample), device)
        yield stash(_first_output(block(hidden.to(device), *args, **kwargs)), storage)


class _GroupFinder:
    """Groups layers by the identity of the tensor they read on one batch, in call order; after the batch, the
    layers it never called get groups of their own (an expert's gate and up matrices together)."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.called: set[str] = set()
        self._inputs: list[torch.Tensor] = []  # each group's input, held so that identities stay unique

    def see(self, name: str, tensor: torch.Tensor) -> list[str] | None:
        """Record a call of layer ``name``; returns the group it starts, if it starts one."""
        if name in self.called:
            return None
        self.called.add(name)
        for group, group_input in zip(self.groups, self._inputs, strict=True):
            if group_input is tensor:
                group.append(name)
                return None
        self.groups.append([name])
        self._inputs.append(tensor)
        return self.groups[-1]

    def finish(self, layers: dict[str, nn.Module]) -> list[list[str]]:
        """Close the batch: release its tensors and add (and return) the groups of the layers never called."""
        self._inputs.clear()
        uncalled: dict[Any, list[str]] = {}
        for name, module in layers.items():
            if name not in self.called:
                key = (
                    (id(module.owner), module.expert, module.role == "down_proj")
                    if isinstance(module, ExpertMatrix)
                    else name
                )
                uncalled.setdefault(key, []).append(name)
        self.groups.extend(uncalled.values())
        return list(uncalled.values())


def _share_groups(
    block: nn.Module, layers: dict[str, nn.Module], inputs: _BlockInputs, index: int, device, experts=()
) -> list[list[str]]:
    """Group the block's layers by shared input, in execution order, from one probe forward on the first batch
    (the gate and up matrices of an expert that receives no token of that batch are grouped by their expert)."""
    finder = _GroupFinder()
    names = {module: name for name, module in layers.items()}

    def hook(module: nn.Module, args: tuple) -> None:  # returns None: a pre-hook's return value replaces the args
        finder.see(names[module], args[0])

    handles = [m.register_forward_pre_hook(hook) for m in layers.values()]
    try:
        probe = _BlockInputs(hidden=inputs.hidden[:1], arguments=inputs.arguments, per_sample=inputs.per_sample)
        with routed_calibration(experts):
            for _ in _run_block(block, probe, index, device, device):
                pass
    finally:
        for handle in handles:
            handle.remove()
    finder.finish(layers)
    return finder.groups


def _accumulate(
    run: _Run,
    block,
    layers,
    groups: list[list[str]] | None,
    inputs,
    index,
    device,
    all_tokens: bool | list[str] = False,
    first_only: bool = False,
) -> tuple[list[list[str]], dict[str, StatisticAccumulator]]:
    """Run the block on every batch; one accumulator of the method's statistic per group, filled by a hook on the
    group's first layer. Experts see the tokens routed to them (every token with ``all_tokens``).

    With ``groups=None`` the groups are found in the same pass, on the first batch: the layers that read the same
    tensor share a group, in execution order (as :func:`_share_groups` finds them, without a forward of its own);
    ``first_only`` keeps statistics for the first group alone (a true-sequential block's first stage). Returns the
    groups and each layer's accumulator."""
    names = {module: name for name, module in layers.items()}
    finding = groups is None
    finder = _GroupFinder()
    groups = finder.groups if groups is None else groups
    leaders: dict[str, StatisticAccumulator] = {}

    def start(group: list[str]) -> None:
        if not (first_only and len(leaders)):
            leaders[group[0]] = run.spec.statistic(get_weight_matrix(layers[group[0]]).shape[1], device)

    for group in groups:
        start(group)

    def hook(module: nn.Module, args: tuple) -> None:
        name = names[module]
        if finding and (new := finder.see(name, args[0])) is not None:
            start(new)
        accumulator = leaders.get(name)
        if accumulator is not None:
            with run.timer.phase("statistics"):
                accumulator.add(args[0])

    def found() -> None:  # after the first batch (or none): the layers it never called join groups of their own
        nonlocal finding
        finding = False
        for group in finder.finish(layers):
            start(group)

    hooked = layers.values() if finding else [layers[group[0]] for group in groups]
    handles = [module.register_forward_pre_hook(hook) for module in hooked]
    try:
        with run.timer.phase("forward"), routed_calibration(run.experts[index], all_tokens):
            for _ in _run_block(block, inputs, index, device, device):
                if finding:
                    found()
    finally:
        for handle in handles:
            handle.remove()
    if finding:
        found()
    accumulators = {name: leaders[group[0]] for group in groups if group[0] in leaders for name in group}
    if run.dist.enabled:
        with run.timer.phase("communication"):
            for accumulator in leaders.values():  # each distinct one once, in group order
                _all_reduce_statistic(run.dist, accumulator)
    return groups, accumulators


def _all_reduce_statistic(dist: Distributed, accumulator: StatisticAccumulator) -> None:
    """Sum an accumulator over the ranks: its tensor value in place (fp32) and its token count."""
    value = accumulator.value
    if isinstance(value, torch.Tensor):
        dist.all_reduce_(value)
    count = torch.tensor([accumulator.num_tokens], dtype=torch.float64)
    dist.all_reduce_(count)
    accumulator.num_tokens = int(count.item())


def _prune_layer(
    name: str, module: nn.Module, accumulator: StatisticAccumulator | None, config: PruningConfig, spec: MethodSpec
) -> LayerReport:
    """Prune one layer in place with the method's function; the error is measured when the statistic is a Gram."""
    start = time.perf_counter()
    dense = get_weight_matrix(module)
    value = None if accumulator is None else accumulator.value
    gram = accumulator.gram if isinstance(accumulator, GramAccumulator) else None
    if spec.mask_fn is not None:
        # A method that only removes weights: zero them in place, a chunk of rows at a time (no pruned copy).
        keep = spec.mask_fn(dense, value, config)
        error = None if gram is None else masked_reconstruction_error(dense, keep, gram)
        for rows in row_chunks(dense):
            dense[rows].masked_fill_(~keep[rows], 0)
        del keep
    else:
        pruned = spec.prune_fn(dense, value, config)
        error = None if gram is None else relative_reconstruction_error(dense, pruned, gram)
        set_weight_matrix(module, pruned)
        del pruned
    if dense.is_cuda:
        torch.cuda.synchronize(dense.device)
    return _layer_row(name, module, dense.shape, error, time.perf_counter() - start, accumulator)


def _layer_row(name, module, shape, error, seconds, accumulator: StatisticAccumulator | None) -> LayerReport:
    """The report row of a layer just pruned: its achieved sparsity read back from the module."""
    sparsity = 1.0 - float(torch.count_nonzero(get_weight_matrix(module))) / (shape[0] * shape[1])
    row = LayerReport(name, tuple(shape), sparsity, error, seconds)
    if accumulator is not None:
        row.num_tokens = accumulator.num_tokens
    return row


def _layer_config(run: _Run, name: str) -> PruningConfig:
    if name in run.targets:  # a non-uniform profile: this layer's own sparsity
        return dataclasses.replace(run.config, sparsity=run.targets[name], sparsity_map={}, sparsity_profile="uniform")
    return run.config


def _solve(run: _Run, name: str, accumulator: StatisticAccumulator | None) -> LayerReport:
    with run.timer.phase("solve"), run.store.module(name) as module:
        return _prune_layer(name, module, accumulator, _layer_config(run, name), run.spec)


#: Layers sharing an input are stacked into one solve up to this many weights (fp32 workspace about 5x this, 4 bytes
#: each); larger layers already run their products at full rate alone.
GROUP_SOLVE_ELEMENTS = 1 << 25


def _solve_units(run: _Run, names: list[str], accumulators: dict[str, StatisticAccumulator]) -> list[list[str]]:
    """The solves of one stage: consecutive layers sharing one statistic together when the method solves groups
    (up to :data:`GROUP_SOLVE_ELEMENTS` weights), every other layer alone."""
    units: list[list[str]] = []
    size = 0
    for name in names:
        if name in run.report.left_dense:
            continue
        elements = get_weight_matrix(run.layers[name]).numel()
        if (
            run.spec.group_fn is not None
            and units
            and accumulators[units[-1][-1]] is accumulators[name]
            and size + elements <= GROUP_SOLVE_ELEMENTS
        ):
            units[-1].append(name)
            size += elements
        else:
            units.append([name])
            size = elements
    return units


def _solve_group(run: _Run, names: list[str], accumulator: StatisticAccumulator) -> list[LayerReport]:
    """Prune layers that read one input with the method's group function; each gets its own report row (its share
    of the solve's time by rows)."""
    if len(names) == 1:
        return [_solve(run, names[0], accumulator)]
    with run.timer.phase("solve"), run.store.modules(names) as modules:
        start = time.perf_counter()
        dense = [get_weight_matrix(module) for module in modules]
        gram = accumulator.gram if isinstance(accumulator, GramAccumulator) else None
        pruned = run.spec.group_fn(dense, accumulator.value, [_layer_config(run, name) for name in names])
        errors = [
            None if gram is None else relative_reconstruction_error(d, p, gram)
            for d, p in zip(dense, pruned, strict=True)
        ]
        for module, weight in zip(modules, pruned, strict=True):
            set_weight_matrix(module, weight)
        del pruned
        if dense[0].is_cuda:
            torch.cuda.synchronize(dense[0].device)
        seconds = time.perf_counter() - start
        rows = sum(d.shape[0] for d in dense)
        return [
            _layer_row(name, module, d.shape, error, seconds * d.shape[0] / rows, accumulator)
            for name, module, d, error in zip(names, modules, dense, errors, strict=True)
        ]


def _record(run: _Run, row: LayerReport) -> None:
    run.report.layers.append(row)
    granularity = 1.0 / row.shape[1]  # a per-row selection rounds to whole weights
    target = run.targets.get(row.name, run.config.sparsity)
    if row.sparsity < target - max(0.01, granularity):
        run.unpruned.append(f"{row.name} (sparsity {row.sparsity:.3f} < {target:.3f})")


def _solve_stage(run: _Run, names: list[str], accumulators: dict[str, StatisticAccumulator]) -> None:
    """Prune the layers of one stage, layers sharing an input in one solve where the method can. With several ranks
    each solve runs on the rank :func:`~optimum_admm.distributed.assign_layers` gives it, and its pruned weights and
    report rows are broadcast."""
    # summed over the ranks: the same everywhere; the capture named most before any work (this finds the rest)
    _left_uncalled(run, [n for n in names if accumulators[n].num_tokens == 0 and n not in run.report.left_dense])
    units = _solve_units(run, names, accumulators)
    costs = {}
    for unit in units:  # a solve's (out x in)(in x in) products
        shapes = [get_weight_matrix(run.layers[n]).shape for n in unit]
        costs[unit[0]] = float(sum(out for out, _ in shapes) * shapes[0][1] ** 2)
    owners = assign_layers(costs, run.dist.world_size)
    rows: dict[str, LayerReport | None] = {}
    unit_bar = tqdm(units, desc="layers", unit="solve", leave=False, disable=not run.show_progress)
    for unit in unit_bar:  # inside a block too: a large model's block takes minutes
        accumulator = accumulators[unit[0]]
        if owners[unit[0]] == run.dist.rank:
            rows.update(zip(unit, _solve_group(run, unit, accumulator), strict=True))
        else:
            rows.update((name, None) for name in unit)
        # The dict holds the only references: a group's statistic is freed once its last layer is pruned.
        for name in unit:
            del accumulators[name]
        del accumulator
        release_freed_host_memory()
    owner_of = {name: owners[unit[0]] for unit in units for name in unit}
    for name in rows:
        if run.dist.enabled:
            with run.timer.phase("communication"), run.store.module(name) as module:
                run.dist.broadcast_(get_weight_matrix(module), owner_of[name])
                rows[name] = run.dist.broadcast_object(rows[name], owner_of[name])
        _record(run, rows[name])


def _left_uncalled(run: _Run, uncalled: list[str]) -> None:
    """Leave dense, in the report and a warning, targeted layers that receive no calibration input."""
    if not uncalled:
        return
    for name in uncalled:
        run.report.left_dense[name] = "no calibration input: used functionally or never called in a causal forward"
    warnings.warn(
        f"{len(uncalled)} targeted layers receive no input in the calibration forward (their weight is read "
        f"functionally, or the module is never called), so they stay dense: {', '.join(uncalled[:6])}"
        + (f", ... {len(uncalled) - 6} more" if len(uncalled) > 6 else "")
        + "; add them to `ignore` to silence this",
        stacklevel=3,
    )


def _prune_block(run: _Run, index: int, inputs: _BlockInputs | None) -> None:
    """Calibrate, prune and (when there are inputs) propagate one loaded block."""
    block, layers = run.blocks[index], run.layers_per_block[index]
    if inputs is None:  # no statistics: every rank prunes every layer alike, nothing to exchange
        for name in layers:
            _record(run, _solve(run, name, None))
        return
    device = execution_device(block)
    every = run.config.calibrate_all_experts
    sequential = run.config.true_sequential
    if every and run.experts[index]:  # groups follow the routed tokens, statistics take every token: two passes
        with run.timer.phase("forward"):
            groups = _share_groups(block, layers, inputs, index, device, run.experts[index])
        release_freed_host_memory()  # the probe forward's temporaries, before the statistics are allocated
        first = None
    else:  # the groups are found in the first statistics pass
        groups, first = _accumulate(run, block, layers, None, inputs, index, device, every, first_only=sequential)
    stages = groups if sequential else [[n for g in groups for n in g]]
    for number, stage in enumerate(stages):
        stage_groups = [g for g in groups if g[0] in stage]
        if number == 0 and first is not None:
            accumulators = first
        else:
            accumulators = _accumulate(run, block, layers, stage_groups, inputs, index, device, every)[1]
        release_freed_host_memory()  # the forwards' temporaries, before the solves allocate theirs
        unrouted = [n for n in stage if isinstance(layers[n], ExpertMatrix) and accumulators[n].num_tokens == 0]
        if unrouted:  # the documented policy: an expert no token reaches is calibrated on every token
            again = [g for g in stage_groups if g[0] in unrouted]
            accumulators.update(_accumulate(run, block, layers, again, inputs, index, device, unrouted)[1])
            for name in unrouted:
                run.report.expert_fallbacks[name] = (
                    f"no calibration token was routed to this expert; calibrated on all "
                    f"{accumulators[name].num_tokens} tokens of the block instead"
                )
            logger.info(
                "block %d: %d expert matrices received no routed token: calibrated on every token",
                index,
                len(unrouted),
            )
        _solve_stage(run, stage, accumulators)
    if index + 1 < len(run.blocks):  # the last block's outputs feed nothing
        with run.timer.phase("forward"):
            inputs.hidden = list(_run_block(block, inputs, index, device, inputs.storage))
        release_freed_host_memory()


def _process_block(run: _Run, index: int, inputs: _BlockInputs | None) -> None:
    """Load, check, prune, record and release block ``index``."""
    run.store.load_block(index)
    if inputs is None and not run.store.resident:  # no calibration forward checked the weights
        check_finite_weights(run.store, index)
    if run.state is not None:
        digest = resume.digest_tensors(run.store.block_tensors(index))
        resume.check_digest(run.checkpoint_dir, run.state, index, run.store.block_name(index), digest)
        if run.dist.is_main:  # only rank 0 writes
            resume.record_digest(run.checkpoint_dir, run.state, index, digest)
    _prune_block(run, index, inputs)
    recorded = None
    if run.state is not None and not run.unpruned:
        recorded = _checkpoint_block(run, index, inputs)
    run.store.commit_block(index, recorded)
    run.store.release_block(index)
    release_freed_host_memory()


def _checkpoint_block(run: _Run, index: int, inputs: _BlockInputs | None) -> Path:
    """Record block ``index`` and the next block's inputs (every rank's share, in sample order) on rank 0."""
    hidden = None
    if inputs is not None and index + 1 < len(run.blocks):
        with run.timer.phase("communication"):
            hidden = run.dist.gather_samples(inputs.hidden, run.num_samples)
    if run.dist.is_main:
        with run.timer.phase("write"):
            run.state.layers = run.report.layers
            resume.save_block(run.checkpoint_dir, index, run.store.block_tensors(index), hidden, run.state)
    run.dist.barrier()  # the recorded shard exists before any rank goes on
    return resume.block_path(run.checkpoint_dir, index)


def _restore(run: _Run, first: int, inputs: _BlockInputs | None) -> None:
    """A resumed run: check and take the blocks finished before the interruption, and the next block's inputs."""
    for index in range(first):
        run.store.load_block(index)
        digest = resume.digest_tensors(run.store.block_tensors(index))
        resume.check_digest(run.checkpoint_dir, run.state, index, run.store.block_name(index), digest)
        run.store.restore_block(index, resume.block_path(run.checkpoint_dir, index))
        run.store.release_block(index)
    run.report.layers = list(run.state.layers)
    if inputs is not None and first < len(run.blocks):
        with run.timer.phase("load"):  # recorded in sample order: this rank's share, whatever the rank count was
            recorded = run.dist.shard(resume.load_inputs(run.checkpoint_dir, first))
            sizes, start, hidden = [int(h.shape[0]) for h in inputs.hidden], 0, []
            for size in sizes:  # batched as this run batches its samples
                hidden.append(stash(torch.cat(recorded[start : start + size]), inputs.storage))
                start += size
            inputs.hidden = hidden


def _start_checkpoint(run: _Run, batches: list[torch.Tensor] | None) -> int:
    """Open (or continue) the run recorded in ``checkpoint_dir``; returns the first block to prune."""
    current = resume.fingerprint(run.model, run.report.config, batches)
    current.update(run.store.identity())
    run.state = resume.load_state(run.checkpoint_dir, current) or resume.CheckpointState(current, 0)
    return run.state.next_block


def _progress(run: _Run, index: int, bar: Any) -> None:
    rows = run.report.layers[-len(run.layers_per_block[index]) :] if run.layers_per_block[index] else []
    errors = [r.relative_error for r in rows if r.relative_error is not None]
    if errors:
        bar.set_postfix(mean_rel_error=f"{sum(errors) / len(errors):.2e}")
        logger.info("block %d: mean relative error %.3e", index, sum(errors) / len(errors))


def prune_model(
    model: nn.Module,
    config: PruningConfig,
    calibration_batches: list[torch.Tensor] | None,
    storage_device: torch.device | str = "cpu",
    show_progress: bool = True,
    *,
    activation_memory: ActivationMemory | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    activation_cache_dir: str | os.PathLike | None = None,
    store: WeightStore | None = None,
    allow_unpruned: bool = False,
) -> PruningReport:
    """Prune ``model`` in place, block by block, with the method registered for ``config``: the one block loop.

    Where the weights live is the ``store``'s business (:mod:`optimum_admm.stores`): in memory, offloaded by an
    accelerate device map (written back through its weights map), or a checkpoint streamed block by block
    (:func:`optimum_admm.streaming.prune_checkpoint`).

    Args:
        model: a causal LM (``PreTrainedModel``) on any device, or spread by an accelerate device map.
        config: the pruning recipe.
        calibration_batches: ``(batch, sequence_length)`` token-id tensors; ``None`` for methods that need none.
        storage_device: where block inputs wait between blocks (``"cpu"`` keeps them off the accelerator).
        show_progress: show a tqdm bar over the blocks.
        activation_memory: budget for the calibration activations on ``storage_device`` (bytes, ``"8GiB"`` or accelerate's
            ``{device: size}`` dict); refused with the numbers before any forward when too small.
        checkpoint_dir: record each finished block there and, when it already holds a run of the same recipe, model
            and data, continue from the next block (see :mod:`optimum_admm.resume`).
        activation_cache_dir: keep the calibration activations in memory-mapped files there instead of on
            ``storage_device``, for calibration sets larger than RAM (see :mod:`optimum_admm.activations`).
        store: where the weights are read and written (default: :func:`optimum_admm.stores.store_for` the model).
        allow_unpruned: prune even when more than 5% of the decoder blocks' matrices are not targeted linears (they
            are named in a warning either way); by default that is refused before any work.

    Returns:
        The :class:`~optimum_admm.reporting.PruningReport`.

    Example:
        >>> report = prune_model(model, ADMMConfig(), batches, checkpoint_dir="ckpt")  # doctest: +SKIP
    """
    run = _new_run(model, config, store, checkpoint_dir)
    _check_profile(run)
    storage = resolve_storage(storage_device, activation_cache_dir)
    if run.spec.needs_calibration:
        _check_batches(run, calibration_batches)
        local = run.dist.shard(calibration_batches)  # this rank's samples
        samples = sum(int(batch.shape[0]) for batch in local)
        check_activation_storage(model, samples, int(calibration_batches[0].shape[1]), activation_memory, storage)
    if run.store.resident and run.spec.needs_calibration:
        _check_causal_now(model)  # a bidirectional model is refused for what it is, before its coverage is judged
    _check_coverage(model, run.store.blocks_name, run.blocks, run.layers_per_block, config, allow_unpruned)
    first = 0 if checkpoint_dir is None else _start_checkpoint(run, calibration_batches)
    if run.store.resident:  # every weight checked before the first forward (a streamed block: as it is read)
        for index in range(len(run.blocks)):
            check_finite_weights(run.store, index)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = None
            if run.spec.needs_calibration and first < len(run.blocks):
                capture = local  # resumed: for the arguments (per sample where they depend on it)
                with run.timer.phase("forward"):
                    inputs = _capture_inputs(model, run.blocks, capture, storage, run.store, run.layers)
                _left_uncalled(run, inputs.uncalled)  # named before any weight changes
            if config.sparsity_profile == "owl":  # from the dense model (a resumed run recomputes the same)
                with run.timer.phase("forward"):
                    run.targets = _owl_targets(run, local)
            if first:
                _restore(run, first, inputs)
            blocks = range(first, len(run.blocks))
            run.show_progress = show_progress and run.dist.is_main
            bar = tqdm(blocks, desc=f"Pruning ({config.method})", unit="block", disable=not run.show_progress)
            # log lines above the bar, never glued onto it (handlers on the root logger or on this package's)
            with logging_redirect_tqdm(loggers=[logging.root, logging.getLogger(__package__)]):
                for index in bar:
                    _process_block(run, index, inputs)
                    _progress(run, index, bar)
    finally:
        model.train(was_training)
    if run.unpruned:
        raise UnprunedLayersError(
            f"{len(run.unpruned)} targeted layers were left dense or below the target sparsity: "
            f"{', '.join(run.unpruned[:5])}; add them to `ignore` or use more calibration samples"
        )
    return _finish_report(run)


def _check_profile(run: _Run) -> None:
    """Per-layer targets of an explicit ``sparsity_map`` (OWL's come after the input capture); refused before any
    work where they cannot be met."""
    config = run.config
    if config.sparsity_profile == "owl" and (not run.spec.needs_calibration or not run.store.resident):
        raise InvalidArgumentError(
            f"sparsity_profile='owl' is invalid for method {config.method!r}"
            + ("" if run.spec.needs_calibration else " (no calibration data)")
            + ("" if run.store.resident else " in streaming mode")
            + "; allowed: a method that calibrates, on a loaded model (in memory or with a device map)"
        )
    if config.sparsity_map and config.sparsity_profile == "uniform":
        run.targets = allocation.allocate(_sizes(run), config.sparsity, fixed=_mapped(run))


def _sizes(run: _Run) -> dict[str, int]:
    return {name: get_weight_matrix(module).numel() for name, module in run.layers.items()}


def _mapped(run: _Run) -> dict[str, float]:
    found = {n: allocation.first_match(n, m, run.config.sparsity_map, matches) for n, m in run.layers.items()}
    return {n: value for n, value in found.items() if value is not None}


def _owl_targets(run: _Run, batches: list[torch.Tensor]) -> dict[str, float]:
    """OWL's per-layer sparsities: one dense forward of every batch collects every targeted layer's input norms
    (experts on their routed tokens), each block's outlier ratio gives its sparsity, the map's layers are held."""
    norms = {name: InputNormAccumulator(get_weight_matrix(m).shape[1]) for name, m in run.layers.items()}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, acc=norms[n]: acc.add(args[0])) for n, m in run.layers.items()
    ]
    device = input_device(run.model)
    try:
        with routed_calibration([s for sets in run.experts for s in sets]):
            for batch in batches:
                run.model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if run.dist.enabled:
        for accumulator in norms.values():
            _all_reduce_statistic(run.dist, accumulator)
    ratios = []
    for layers in run.layers_per_block:
        weights = []
        for name in layers:
            with run.store.module(name, write=False) as module:
                weights.append(get_weight_matrix(module).detach().to("cpu", copy=True))
        ratios.append(allocation.outlier_ratio(weights, [norms[n].value for n in layers], run.config.owl_m))
    blocks = allocation.owl_sparsities(ratios, run.config.sparsity, run.config.owl_lambda)
    base = {name: blocks[i] for i, layers in enumerate(run.layers_per_block) for name in layers}
    logger.info("OWL block sparsities: %s", ", ".join(f"{s:.3f}" for s in blocks))
    return allocation.allocate(_sizes(run), run.config.sparsity, base=base, fixed=_mapped(run))


def _check_batches(run: _Run, batches: list[torch.Tensor] | None) -> None:
    if not batches:
        raise InvalidArgumentError(f"method {run.config.method!r} needs calibration_batches; got none")
    if any(int(b.shape[0]) != 1 for b in batches) and run.dist.enabled:
        raise InvalidArgumentError("calibration_batches must hold one sample each when pruning with several ranks")
    if len(batches) < run.dist.world_size:
        raise InvalidArgumentError(
            f"num_samples={len(batches)} is invalid with {run.dist.world_size} ranks; allowed: at least one "
            "calibration sample per rank"
        )
    run.num_samples = len(batches)


#: The share of the decoder blocks' matrices that may stay dense without the user asking (``allow_unpruned``).
DENSE_SHARE_LIMIT = 0.05


def _check_coverage(model, blocks_name, blocks, layers, config, allow_unpruned: bool) -> None:
    """Never a silent partial prune: name, before any work, the matrices no targeted layer covers, inside the
    decoder blocks (fused tensors outside the experts interface, weights read functionally) and outside them (a
    second block stack, projections), and refuse when they exceed :data:`DENSE_SHARE_LIMIT`. Embeddings, the head,
    ``ignore`` and a multimodal model's towers and projectors stay dense by default."""
    if language_model(model) is not None:
        for tower in towers(model):
            size = sum(p.numel() for p in model.get_submodule(tower).parameters())
            logger.warning("left dense by default: %s (%s parameters), a separate vision or audio model", tower,
                           f"{size:,}")  # fmt: skip
    inside, total = dense_block_parameters(blocks_name, blocks, layers, config.ignore)
    outside = dense_outside_blocks(model, blocks_name, config.ignore)
    left = sorted(inside + outside, key=lambda item: -item[1])
    total += sum(numel for _, numel in outside)
    share = sum(numel for _, numel in left) / total if total else 0.0
    if not left:
        return
    names = ", ".join(f"{name} ({numel:,})" for name, numel in left[:5]) + (
        f", ... {len(left) - 5} more" if len(left) > 5 else ""
    )
    where = "model's matrices besides embeddings and head" if outside else "decoder blocks' weights"
    if share > DENSE_SHARE_LIMIT and not allow_unpruned:
        raise UnprunedLayersError(
            f"{share:.0%} of the {where} would stay dense: {names} (not nn.Linear layers the targets select "
            f"inside the decoder blocks {blocks_name}: fused expert tensors, weights read functionally, or a second "
            "block stack); pass allow_unpruned=True (--allow-unpruned) to prune the rest anyway, or add them to "
            "`ignore` to say they stay dense on purpose"
        )
    warnings.warn(f"{share:.1%} of the {where} stay dense: {names}", stacklevel=4)


def _check_causal_now(model: nn.Module) -> None:
    """:func:`check_causal` in eval mode without gradients (magnitude runs no forward at all, and needs none)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            check_causal(model)
    finally:
        model.train(was_training)


def _new_run(model, config, store, checkpoint_dir) -> _Run:
    blocks_name, blocks = find_decoder_blocks(model)
    default_targets = default_of(type(config), "targets")
    layers = find_prunable_layers(model, config.targets, config.ignore, blocks, blocks_name, default_targets)
    store = store or store_for(model)
    store.bind(blocks_name, blocks)
    report = PruningReport(method=config.method, config=config.to_dict())
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    run = _Run(model, config, get_spec(config), store, blocks, layers, report, store.timer, directory)
    run.dist = current_group()
    run.layers = {name: module for block_layers in layers for name, module in block_layers.items()}
    run.experts = [find_experts(block, store.block_name(i)) for i, block in enumerate(blocks)]
    return run


def _finish_report(run: _Run) -> PruningReport:
    seconds, report = run.timer.seconds, run.report
    report.forward_seconds = seconds["forward"]
    report.statistics_seconds = seconds["statistics"]
    report.solve_seconds = seconds["solve"]
    report.load_seconds, report.write_seconds = seconds["load"], seconds["write"]
    report.communication_seconds = seconds["communication"]
    report.total_seconds = run.timer.wall
    report.parameters = _parameters_by_kind(run)
    return report


def _parameter_kind(name: str, blocks_name: str) -> str:
    from .inspection import _kind

    if not name.startswith(f"{blocks_name}."):
        return "outside blocks"
    if ".experts." in name:
        return "experts"
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
    return "other" if "norm" in module else _kind(name)  # post_attention_layernorm is not attention


def _parameters_by_kind(run: _Run) -> dict[str, dict[str, int]]:
    """Every parameter of the model (shapes only: works on a meta skeleton) by kind, with the zeros this run made."""
    blocks_name, _ = find_decoder_blocks(run.model)
    counts: dict[str, dict[str, int]] = {}
    for name, param in run.model.named_parameters():  # tied tensors once
        entry = counts.setdefault(_parameter_kind(name, blocks_name), {"total": 0, "zeros": 0})
        entry["total"] += param.numel()
    for row in run.report.layers:
        entry = counts.setdefault(_parameter_kind(f"{row.name}.weight", blocks_name), {"total": 0, "zeros": 0})
        entry["zeros"] += round(row.sparsity * row.shape[0] * row.shape[1])
    return counts
