"""Fused mixture-of-experts weights as per-expert pruning problems, calibrated on the tokens the router sends.

transformers 5 stores the experts of a MoE layer as fused 3-D parameters (``gate_up_proj`` ``(E, 2I, H)`` and
``down_proj`` ``(E, H, I)`` in Mixtral's layout; transposed, interleaved or with biases in others) inside one module
decorated with ``transformers.integrations.moe.use_experts_implementation``. That decorator gives every such module
the same description of its layout (``has_gate``, ``is_transposed``, ``is_concatenated``, ``has_bias``,
``has_post_expert_norm``) and dispatches its forward through ``ALL_EXPERTS_FUNCTIONS``. Both are used here, so no
family is named:

- :class:`ExpertMatrix` is one expert's gate, up or down matrix seen as a linear layer: a view ``(out, in)`` of the
  fused parameter, read afresh at every use (an offload hook or a streamed checkpoint may have replaced the tensor).
  It is not a submodule of the model; it is named ``<experts module>.<expert>.<gate_proj|up_proj|down_proj>`` (the
  per-expert names checkpoints use) and the driver prunes it like any linear.
- :func:`routed_calibration` switches the experts modules of a block, for the duration of a calibration forward, to
  an experts implementation registered here that runs each expert through its :class:`ExpertMatrix` modules on the
  tokens routed to it (routing and gating exactly as the model's own forward: ``_apply_gate``, the routing weights,
  the post-expert norm). Forward hooks on those modules therefore see each expert's routed tokens; with
  ``all_tokens`` an expert sees every token of the batch (for statistics) while its output is still routed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "ExpertMatrix",
    "ExpertSet",
    "expert_matrix",
    "expert_parameters",
    "find_experts",
    "is_experts_module",
    "routed_calibration",
]

#: The key under which the calibration forward is registered in transformers' ``ALL_EXPERTS_FUNCTIONS``.
IMPLEMENTATION = "optimum_admm_routed_calibration"
ROLES = ("gate_proj", "up_proj", "down_proj")


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` holds fused expert weights behind transformers' common experts interface.

    Example:
        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> model = MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, num_key_value_heads=1, vocab_size=32, num_local_experts=4))
        >>> is_experts_module(model.model.layers[0].mlp.experts), is_experts_module(model.model.layers[0].mlp)
        (True, False)
    """
    if not all(hasattr(module, flag) for flag in ("has_gate", "is_transposed", "has_bias")):
        return False
    down = getattr(module, "down_proj", None)
    first = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    return all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in (down, first))


def expert_parameters(module: nn.Module) -> list[str]:
    """The fused weight parameters of an experts module (not its biases): ``["gate_up_proj", "down_proj"]`` or
    ``["up_proj", "down_proj"]``."""
    return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]


class ExpertMatrix(nn.Module):
    """One expert's gate, up or down matrix of a fused experts module, as an ``(out_features, in_features)`` linear.

    Args:
        owner: the experts module.
        expert: the expert's index.
        role: ``"gate_proj"``, ``"up_proj"`` or ``"down_proj"``.

    Example:
        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> model = MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, num_key_value_heads=1, vocab_size=32, num_local_experts=4))
        >>> experts = model.model.layers[0].mlp.experts
        >>> ExpertMatrix(experts, 1, "up_proj").matrix().shape  # rows 32..63 of gate_up_proj[1]
        torch.Size([32, 16])
    """

    #: An expert's matrix is a linear map: the class-name target ``"Linear"`` selects it (see :func:`matches`).
    linear_aliases = ("Linear",)

    def __init__(self, owner: nn.Module, expert: int, role: str) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"role={role!r} is invalid; allowed: {ROLES}")
        object.__setattr__(self, "_owner", weakref.ref(owner))  # not a submodule: the proxy is no part of the model
        self.expert, self.role = expert, role
        if role == "down_proj":
            self.parameter, self.rows = "down_proj", None
        elif not owner.has_gate:
            self.parameter, self.rows = "up_proj", None
        else:
            self.parameter = "gate_up_proj"
            half = 0 if role == "gate_proj" else 1
            if getattr(owner, "is_concatenated", True):  # [gate; up]
                size = getattr(owner, self.parameter).shape[2 if owner.is_transposed else 1] // 2
                self.rows = slice(half * size, (half + 1) * size)
            else:  # [gate0, up0, gate1, up1, ...]
                self.rows = slice(half, None, 2)

    @property
    def owner(self) -> nn.Module:
        return self._owner()

    def matrix(self, data: bool = True) -> torch.Tensor:
        """The expert's matrix as ``(out, in)``: a view of the fused parameter (writes go through)."""
        fused = getattr(self.owner, self.parameter)
        weight = (fused.data if data else fused)[self.expert]
        if self.owner.is_transposed:
            weight = weight.T
        return weight if self.rows is None else weight[self.rows]

    def bias(self) -> torch.Tensor | None:
        if not self.owner.has_bias:
            return None
        bias = getattr(self.owner, f"{self.parameter}_bias")[self.expert]
        return bias if self.rows is None else bias[self.rows]

    @property
    def in_features(self) -> int:
        return int(self.matrix().shape[1])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(inputs, self.matrix(data=False), self.bias())

    def extra_repr(self) -> str:
        out, inp = self.matrix().shape
        return f"expert={self.expert}, role={self.role}, in_features={inp}, out_features={out}"


# One set of matrices per experts module, so the driver, the stores and the calibration forward share the objects.
_SETS: weakref.WeakKeyDictionary[nn.Module, ExpertSet] = weakref.WeakKeyDictionary()


@dataclass
class ExpertSet:
    """The :class:`ExpertMatrix` modules of one experts module, per expert: ``matrices[e][role]``."""

    name: str
    reference: weakref.ref  # to the experts module (the cache is keyed by it: a strong reference would pin it)
    matrices: list[dict[str, ExpertMatrix]]
    #: experts calibrated on every token of a batch (while :func:`routed_calibration` is active)
    all_tokens: set[int] = field(default_factory=set)

    @property
    def module(self) -> nn.Module:
        return self.reference()

    def named_matrices(self) -> Iterator[tuple[str, ExpertMatrix]]:
        for expert, roles in enumerate(self.matrices):
            for role, matrix in roles.items():
                yield f"{self.name}.{expert}.{role}", matrix


def expert_set(module: nn.Module, name: str) -> ExpertSet:
    """The (cached) :class:`ExpertSet` of an experts module."""
    found = _SETS.get(module)
    if found is None or found.name != name:
        roles = ROLES if module.has_gate else ROLES[1:]
        matrices = [{role: ExpertMatrix(module, e, role) for role in roles} for e in range(module.down_proj.shape[0])]
        found = _SETS[module] = ExpertSet(name, weakref.ref(module), matrices)
    return found


def find_experts(block: nn.Module, prefix: str) -> list[ExpertSet]:
    """The experts modules inside ``block`` (named under ``prefix``), with their matrices."""
    return [
        expert_set(module, f"{prefix}.{local}" if local else prefix)
        for local, module in block.named_modules()
        if is_experts_module(module)
    ]


def expert_matrix(model: nn.Module, name: str) -> tuple[str, ExpertMatrix] | None:
    """``(experts module name, matrix)`` for a name ``<experts module>.<expert>.<role>``; ``None`` for any other."""
    owner, _, rest = name.rpartition(".")
    owner, _, expert = owner.rpartition(".")
    if rest not in ROLES or not expert.isdigit() or not owner:
        return None
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    if not is_experts_module(module) or int(expert) >= module.down_proj.shape[0]:
        return None
    roles = expert_set(module, owner).matrices[int(expert)]
    return (owner, roles[rest]) if rest in roles else None


def _calibration_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward of the interface, one expert at a time through its :class:`ExpertMatrix` modules."""
    experts = _SETS[self]
    output = torch.zeros_like(hidden_states)
    for expert, roles in enumerate(experts.matrices):
        tokens, slots = torch.where(top_k_index == expert)
        every = expert in experts.all_tokens
        if tokens.numel() == 0 and not every:
            continue
        inputs = hidden_states if every else hidden_states[tokens]
        if self.has_gate:
            gate, up = roles["gate_proj"](inputs), roles["up_proj"](inputs)
            if getattr(self, "is_concatenated", True):
                gate_up = torch.cat([gate, up], dim=-1)
            else:
                gate_up = torch.stack([gate, up], dim=-1).flatten(-2)
            hidden = self._apply_gate(gate_up)
        else:
            hidden = self.act_fn(roles["up_proj"](inputs))
        out = roles["down_proj"](hidden)
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        if every:
            out = out[tokens]
        output.index_add_(0, tokens, (out * top_k_weights[tokens, slots, None]).to(output.dtype))
    return output


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _calibration_forward)


@contextlib.contextmanager
def routed_calibration(sets: Iterable[ExpertSet], all_tokens: bool | Iterable[str] = False) -> Iterator[None]:
    """Run the experts modules of ``sets`` through :class:`ExpertMatrix` modules while the context is active.

    Args:
        sets: the experts modules (of the block being calibrated).
        all_tokens: ``True``: every expert sees every token; or the matrix names whose expert does.
    """
    sets = list(sets)
    if not sets:
        yield
        return
    _register()
    chosen = set() if isinstance(all_tokens, bool) else set(all_tokens)
    configs: dict[int, tuple[object, object]] = {}
    for experts in sets:
        experts.all_tokens = {
            e
            for e, roles in enumerate(experts.matrices)
            if all_tokens is True or any(f"{experts.name}.{e}.{role}" in chosen for role in roles)
        }
        config = experts.module.config
        if id(config) not in configs:
            configs[id(config)] = (config, config._experts_implementation_internal)
    try:
        for config, _ in configs.values():
            # The internal attribute, as transformers' own set_experts_implementation does for one config: the
            # public setter would also switch sub-configs, and the choice is undone below.
            config._experts_implementation_internal = IMPLEMENTATION
        yield
    finally:
        for config, previous in configs.values():
            config._experts_implementation_internal = previous
        for experts in sets:
            experts.all_tokens = set()
