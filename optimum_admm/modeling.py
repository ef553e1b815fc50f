"""Model structure without per-architecture copies: decoder blocks, prunable linears, target matching.

Decoder blocks are found as the largest ``nn.ModuleList`` of identical modules that contain linear layers, which
covers LLaMA, Mistral, Qwen2, Gemma (``model.layers``), OPT (``model.decoder.layers``), GPT-2 (``transformer.h``),
GPT-NeoX (``gpt_neox.layers``) and most other causal LMs without naming any of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .errors import InvalidArgumentError
from .experts import ExpertMatrix, expert_parameters, find_experts

__all__ = [
    "find_decoder_blocks",
    "find_prunable_layers",
    "matches",
    "get_weight_matrix",
    "set_weight_matrix",
    "dense_block_parameters",
    "execution_device",
    "is_linear",
    "weight_name",
    "dense_outside_blocks",
    "towers",
    "language_model",
]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or transformers' GPT-2 style ``Conv1D`` (weights stored transposed)."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def towers(model: nn.Module) -> list[str]:
    """Names of the separate models inside a multimodal model (vision and audio towers): nested ``PreTrainedModel``
    submodules configured by neither the model's config nor its text config. They are left dense by default.

    Example:
        >>> from torch import nn
        >>> towers(nn.Linear(2, 2))
        []
    """
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found: list[str] = []
    for name, module in model.named_modules():
        sub = getattr(module, "config", None)
        if not name or sub is None or sub is config or sub is text or not hasattr(module, "base_model_prefix"):
            continue
        if not any(name.startswith(f"{outer}.") for outer in found):
            found.append(name)
    return found


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(name, blocks)`` for the decoder blocks of ``model``.

    Raises:
        ValueError: when no ``nn.ModuleList`` of identical blocks holding linear layers exists.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> find_decoder_blocks(model)[0]
        'model.layers'
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    separate = towers(model)  # a vision tower's encoder layers are not the language decoder
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(f"{tower}.") for tower in separate):
            continue
        first_type = type(module[0])
        if not all(type(child) is first_type for child in module):
            continue
        if not all(any(is_linear(m) for m in child.modules()) for child in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise InvalidArgumentError(
            f"model of type {type(model).__name__} has no decoder blocks that optimum-admm can find: expected an "
            "nn.ModuleList of identical blocks containing nn.Linear (or Conv1D) layers"
        )
    return best[1], best[2]


def matches(name: str, module: nn.Module, pattern: str) -> bool:
    """Whether a module matches a target/ignore ``pattern``.

    A pattern is a class name (``"Linear"``, matched along the class hierarchy, so subclasses of ``nn.Linear``
    match it), a module name matched on dot boundaries from the right
    (``"q_proj"``, ``"self_attn.q_proj"``, ``"lm_head"``) or ``"re:<regex>"`` matched in full against the module
    name.

    Example:
        >>> from torch import nn
        >>> matches("model.layers.0.self_attn.q_proj", nn.Linear(2, 2), "q_proj")
        True
        >>> matches("model.layers.0.mlp.up_proj", nn.Linear(2, 2), "re:.*mlp\\\\..*")
        True
        >>> matches("model.layers.0.mlp.up_proj", nn.Linear(2, 2), "proj")
        False
        >>> class FalconLinear(nn.Linear): ...
        >>> matches("transformer.h.0.mlp.dense_4h_to_h", FalconLinear(2, 2), "Linear")
        True
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    classes = [cls.__name__ for cls in type(module).__mro__[:-1]] + list(getattr(module, "linear_aliases", ()))
    if pattern in classes:  # along the class hierarchy: "Linear" matches Falcon's FalconLinear(nn.Linear) and
        return True  # other subclasses, and one expert's matrix of fused experts (an ExpertMatrix)
    return name == pattern or name.endswith("." + pattern)


def _matches_any(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
    return any(matches(name, module, p) for p in patterns)


def find_prunable_layers(
    model: nn.Module,
    targets: list[str],
    ignore: list[str],
    blocks: nn.ModuleList | None = None,
    blocks_name: str | None = None,
    default_targets: Iterable[str] = (),
) -> list[dict[str, nn.Module]]:
    """The linears to prune, per decoder block, as ``[{full_name: module}, ...]``.

    A target pattern that matches no module of the model raises (class-name defaults such as ``"Conv1D"`` on a
    model without Conv1D are exempt), and so does a selection that is empty.
    """
    if blocks is None or blocks_name is None:
        blocks_name, blocks = find_decoder_blocks(model)
    all_modules = list(model.named_modules())
    all_modules += [item for block_experts in _model_experts(blocks, blocks_name) for item in block_experts]
    for pattern in targets:
        if pattern in default_targets:
            continue
        if not any(matches(name, module, pattern) for name, module in all_modules):
            raise InvalidArgumentError(
                f"targets pattern {pattern!r} matches no module of {type(model).__name__}; module names look like "
                f"{[n for n, m in all_modules if is_linear(m)][:4]}"
            )
    per_block: list[dict[str, nn.Module]] = []
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}" if blocks_name else str(index)
        layers = {}
        for local_name, module in block.named_modules():
            name = f"{prefix}.{local_name}" if local_name else prefix
            if is_linear(module) and _matches_any(name, module, targets) and not _matches_any(name, module, ignore):
                layers[name] = module
        for experts in find_experts(block, prefix):  # fused experts: one linear per expert and matrix
            for name, matrix in experts.named_matrices():
                if _matches_any(name, matrix, targets) and not _matches_any(name, matrix, ignore):
                    layers[name] = matrix
        per_block.append(layers)
    if not any(per_block):
        raise InvalidArgumentError(
            f"targets={targets!r} with ignore={ignore!r} select no linear layer inside the decoder blocks "
            f"({blocks_name}) of {type(model).__name__}"
        )
    return per_block


def _model_experts(blocks: nn.ModuleList, blocks_name: str) -> list[list[tuple[str, ExpertMatrix]]]:
    prefixes = [f"{blocks_name}.{i}" if blocks_name else str(i) for i in range(len(blocks))]
    return [
        [item for experts in find_experts(block, prefix) for item in experts.named_matrices()]
        for prefix, block in zip(prefixes, blocks, strict=True)
    ]


def dense_block_parameters(
    blocks_name: str, blocks: nn.ModuleList, layers_per_block: list[dict[str, nn.Module]], ignore: Iterable[str]
) -> tuple[list[tuple[str, int]], int]:
    """The matrices (parameters with two or more dimensions) inside the decoder blocks that no linear layer owns
    (such as fused expert tensors) and no ``ignore`` pattern names, largest first, and the number of elements of all
    the blocks' matrices. Linears that the targets or ``ignore`` leave out are left out on purpose, and not listed.

    Example:
        >>> from torch import nn
        >>> blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4))])
        >>> dense_block_parameters("", blocks, [{"0.0": blocks[0][0]}], [])
        ([], 16)
    """
    patterns = list(ignore)
    left: list[tuple[str, int]] = []
    total = 0
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}" if blocks_name else str(index)
        owned = {id(module) for module in layers_per_block[index].values()}
        # a fused experts tensor is covered by its experts' matrices (some may be ignored on purpose)
        experts = {id(m.owner) for m in layers_per_block[index].values() if isinstance(m, ExpertMatrix)}
        for local, module in block.named_modules():
            name = f"{prefix}.{local}" if local else prefix
            for parameter_name, parameter in module.named_parameters(recurse=False):
                if parameter.dim() < 2:
                    continue
                total += parameter.numel()
                # A linear that is not targeted was left out by the targets or ignore patterns: on purpose.
                if id(module) in experts and (
                    parameter_name in expert_parameters(module) or parameter_name.endswith("_bias")
                ):
                    continue  # the experts' weights (pruned per expert) and their biases (never pruned)
                if id(module) not in owned and not is_linear(module) and not _matches_any(name, module, patterns):
                    left.append((f"{name}.{parameter_name}", parameter.numel()))
    return sorted(left, key=lambda item: -item[1]), total


def dense_outside_blocks(model: nn.Module, blocks_name: str, ignore: Iterable[str]) -> list[tuple[str, int]]:
    """Matrices outside the decoder blocks that stay dense without being asked to (a second block stack,
    projections), largest first. Input and output embeddings, what ``ignore`` names and, in a multimodal model,
    everything outside its language model (towers, projectors) are left out: they stay dense by default.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]), nn.Linear(2, 3))
        >>> dense_outside_blocks(model, "0", [])
        [('1.weight', 6)]
    """
    patterns = list(ignore)
    language = language_model(model)
    embeddings = [m for m in (_call(model, "get_input_embeddings"), _call(model, "get_output_embeddings")) if m]
    exempt = {id(p) for m in embeddings for p in m.parameters()}
    left = []
    for name, module in model.named_modules():
        if name == blocks_name or name.startswith(f"{blocks_name}.") or isinstance(module, nn.Embedding):
            continue
        if language is not None and not (name == language or name.startswith(f"{language}.")):
            continue
        if _matches_any(name, module, patterns):
            continue
        for local, parameter in module.named_parameters(recurse=False):
            if parameter.dim() >= 2 and id(parameter) not in exempt:
                left.append((f"{name}.{local}" if name else local, parameter.numel()))
    return sorted(left, key=lambda item: -item[1])


def language_model(model: nn.Module) -> str | None:
    """The name of a multimodal model's language model (the submodule configured by its text config), ``None`` for
    a text-only model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    text = config.get_text_config()
    if text is config:
        return None
    return next((n for n, m in model.named_modules() if n and getattr(m, "config", None) is text), None)


def _call(model: nn.Module, method: str) -> nn.Module | None:
    try:
        return getattr(model, method)() if hasattr(model, method) else None
    except (NotImplementedError, AttributeError):
        return None


def weight_name(model: nn.Module, layer: str) -> str:
    """The parameter holding a pruned layer's weight: ``<layer>.weight``, or the fused experts tensor of one
    expert's matrix (``...experts.3.down_proj`` -> ``...experts.down_proj``).

    Example:
        >>> from torch import nn
        >>> weight_name(nn.Sequential(nn.Linear(2, 2)), "0")
        '0.weight'
    """
    from .experts import expert_matrix

    found = expert_matrix(model, layer)
    return f"{layer}.weight" if found is None else f"{found[0]}.{found[1].parameter}"


def get_weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out_features, in_features)`` (a transposed view for ``Conv1D``).

    The one accessor of a module's weight outside the stores: call it on a module whose weights are present (held by
    :meth:`optimum_admm.stores.WeightStore.module`, or an in-memory model).
    """
    if isinstance(module, ExpertMatrix):
        return module.matrix()
    return module.weight.data.T if _is_conv1d(module) else module.weight.data


def set_weight_matrix(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``(out_features, in_features)`` weight back in the module's own layout, dtype and device."""
    target = module.matrix() if isinstance(module, ExpertMatrix) else module.weight.data
    value = weight.T if _is_conv1d(module) else weight
    target.copy_(value.to(device=target.device, dtype=target.dtype))


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's hook execution device if it has one, else its first parameter's."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")
