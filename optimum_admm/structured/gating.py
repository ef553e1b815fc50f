"""Hard-concrete gates applied to a stock transformers model through hooks (no forked modeling code).

:class:`ShearingModule` holds the gate logits, the Lagrange multipliers and the plan, and :meth:`ShearingModule.attach`
registers hooks on a LLaMA-like model:

* a forward pre-hook on the whole model draws the gates once per forward (hard-concrete samples in training mode,
  the final top-k values in eval mode); every other hook reads that draw, so recomputation under gradient
  checkpointing (non-reentrant, the transformers default) reuses the same sample;
* head gates multiply each head's attention output before ``o_proj`` (expanded over the query heads of a KV group in
  ``'kv_group'`` mode); FFN gates multiply the input of ``down_proj``;
* layer and hidden gates multiply the outputs of ``o_proj`` and ``down_proj``; hidden gates also multiply the
  embedding output;
* every residual-stream RMSNorm is replaced, through a forward hook, by a masked RMSNorm whose mean of squares runs
  over the hidden channels with a non-zero gate and whose output is multiplied by the hidden gate;
* in a hand-written loop (``penalty_in_loss=True``, the default) an output hook adds the Lagrangian to
  ``outputs.loss`` in training mode. Under ``transformers.Trainer`` the callback turns that off and instead, once per
  optimiser step, averages the gate gradients over the processes (as DDP averages the weights' gradients) and adds
  the Lagrangian's gradient once (:meth:`ShearingModule.finish_gradients`): the balance between the LM loss and the
  constraint is then the same for any gradient accumulation, number of processes and token averaging.

Gate draws come from each process's global torch RNG, exactly like dropout's, so every rank draws its own sample
and the Trainer's RNG checkpoints make a resume exact.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from optimum_admm.structured import ShearingConfig, ShearingModule
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, vocab_size=10))
    >>> shearing = ShearingModule.from_model(model, ShearingConfig(num_hidden_layers=1, intermediate_size=16))
    >>> shearing.attach(model)
    >>> _ = model(torch.tensor([[1, 2, 3]]))
    >>> shearing.detach()
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configuration import ShearingConfig, ShearingPlan
from .hard_concrete import HardConcreteGates
from .lagrangian import LagrangianMultipliers, expected_shape, expected_sparsity, warmup_target
from .layout import ModelLayout, norm_epsilon
from .masks import final_gates

logger = logging.getLogger(__name__)

__all__ = ["GATE_MODES", "ShearingModule", "masked_rms_norm"]

GATE_MODES = ("auto", "sample", "final", "median")
STATE_FILE = "shearing_state.safetensors"


def masked_rms_norm(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the channels whose ``gate`` is non-zero, times ``gate``.

    The channels with a zero gate must already be zero in ``x`` (they are, on a gated residual stream).

    Example:
        >>> x = torch.tensor([[3.0, 4.0, 0.0]])
        >>> masked_rms_norm(x, torch.ones(3), torch.tensor([1.0, 1.0, 0.0]), eps=0.0)
        tensor([[0.8485, 1.1314, 0.0000]])
    """
    kept = (gate != 0).sum().clamp(min=1)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / kept + eps)
    out = weight * normed.to(x.dtype)
    return out * gate.to(out.dtype)


class ShearingModule(nn.Module):
    """Gate logits, Lagrange multipliers and the hooks that apply them to one model.

    Args:
        config: The recipe.
        plan: The recipe resolved against the source model (:meth:`ShearingConfig.plan`).

    Attributes:
        gate_mode: ``"auto"`` (sample in training mode, final gates in eval mode), ``"sample"``, ``"final"`` or
            ``"median"`` (the noise-free draw ``u = 1/2``: deterministic, for reproducibility checks).
        num_samples: How many gate draws have been made (one per model forward).
        penalty_in_loss: Add the Lagrangian to ``outputs.loss`` of every training forward (for hand-written loops).
            The Trainer integration sets it to ``False`` and applies the Lagrangian once per optimiser step.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     vocab_size=10)
        >>> config = ShearingConfig(num_hidden_layers=1)
        >>> ShearingModule(config, config.plan(cfg)).gates.structures
        ['layer', 'head', 'intermediate', 'hidden']
    """

    def __init__(self, config: ShearingConfig, plan: ShearingPlan) -> None:
        super().__init__()
        self.config = config
        self.plan = plan
        self.gates = HardConcreteGates(
            plan.gate_shapes(),
            temperature=config.temperature,
            limit_left=config.limit_left,
            limit_right=config.limit_right,
            epsilon=config.epsilon,
            init_log_alpha=config.init_log_alpha,
            log_alpha_range=(config.log_alpha_min, config.log_alpha_max),
        )
        self.lagrangian = LagrangianMultipliers(plan.structures)
        self.gate_mode = "auto"
        self.num_samples = 0
        self.penalty_in_loss = True
        self.step, self.total_steps = 0, 1
        self.last_metrics: dict[str, float] = {}
        self._z: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    @classmethod
    def from_model(cls, model: nn.Module, config: ShearingConfig) -> ShearingModule:
        """Resolve ``config`` against ``model.config`` and build the module on the model's device."""
        module = cls(config, config.plan(model.config))
        return module.to(next(model.parameters()).device)

    # ----------------------------------------------------------------------------------------------- gate values
    def final_gates(self) -> dict[str, torch.Tensor]:
        """Deterministic gates: exactly the target count kept per row, ``sigmoid(0.8 a / beta)`` on the survivors."""
        values = self.gates.deterministic_values(self.config.deterministic_scale)
        scores = {name: param.detach() for name, param in self.gates.log_alpha.items()}
        return final_gates(scores, self.plan, values)

    def _draw(self, training: bool) -> dict[str, torch.Tensor]:
        mode = self.gate_mode if self.gate_mode != "auto" else ("sample" if training else "final")
        if mode not in GATE_MODES[1:]:
            raise ValueError(f"gate_mode={self.gate_mode!r} is unknown; allowed: {GATE_MODES}")
        self.num_samples += mode == "sample"
        if mode == "median":
            return self.gates.median()
        return self.gates.sample() if mode == "sample" else self.final_gates()

    def _scale(self, layer: int) -> torch.Tensor | None:
        """Product of the layer gate of ``layer`` and the hidden gate (``None`` when neither is learnt)."""
        scale = self._z.get("hidden")
        if "layer" in self._z:
            layer_gate = self._z["layer"][layer]
            scale = layer_gate if scale is None else scale * layer_gate
        return scale

    def _head_channels(self, layer: int) -> torch.Tensor:
        gate = self._z["head"][layer]
        group = self.plan.source["num_attention_heads"] // gate.numel()
        return gate.repeat_interleave(group * self.plan.head_dim)

    # ------------------------------------------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module) -> None:
        """Register the gating hooks on ``model`` (whose shape must be the plan's source shape).

        Raises:
            RuntimeError: when already attached.
            ValueError: when the model's shape differs from the plan's source.
        """
        if self._handles:
            raise RuntimeError("ShearingModule is already attached; call detach() first")
        layout = ModelLayout.of(model)
        if len(layout.blocks) != self.plan.source["num_hidden_layers"]:
            raise ValueError(f"model has {len(layout.blocks)} layers, the plan expects {self.plan.source}")
        handles = self._handles
        handles.append(model.register_forward_pre_hook(self._on_model_start))
        handles.append(model.register_forward_hook(self._on_model_end))
        structures = set(self.plan.structures)
        if "hidden" in structures:
            handles.append(layout.embed.register_forward_hook(lambda m, a, out: out * self._z["hidden"].to(out.dtype)))
            for norm in layout.norms():
                handles.append(norm.register_forward_hook(self._norm_hook, with_kwargs=True))
        for index, block in enumerate(layout.blocks):
            o_proj, down_proj = layout.attn(block, "o_proj"), layout.mlp(block, "down_proj")
            if "head" in structures:
                handles.append(
                    o_proj.register_forward_pre_hook(self._input_hook(lambda i=index: self._head_channels(i)))
                )
            if "intermediate" in structures:
                handles.append(
                    down_proj.register_forward_pre_hook(self._input_hook(lambda i=index: self._z["intermediate"][i]))
                )
            if structures & {"layer", "hidden"}:
                handles.append(o_proj.register_forward_hook(self._output_hook(index)))
                handles.append(down_proj.register_forward_hook(self._output_hook(index)))
        logger.info("Attached Sheared-LLaMA gates %s (%d hooks)", list(self.plan.gate_shapes().items()), len(handles))

    def detach(self) -> None:
        """Remove every hook registered by :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._z = {}

    @property
    def attached(self) -> bool:
        """Whether hooks are registered."""
        return bool(self._handles)

    def _on_model_start(self, model: nn.Module, args: Any) -> None:
        self._z = self._draw(model.training)

    def _on_model_end(self, model: nn.Module, args: Any, output: Any) -> Any:
        loss = output.get("loss") if isinstance(output, dict) else None
        if model.training and loss is not None and self.penalty_in_loss:
            output["loss"] = loss + self.penalty().to(loss.dtype)
        return output

    def _input_hook(self, gate_fn: Any) -> Any:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (x * gate_fn().to(x.dtype), *args[1:])

        return hook

    def _output_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * self._scale(layer).to(output.dtype)

        return hook

    def _norm_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else kwargs["hidden_states"]
        return masked_rms_norm(x, module.weight, self._z["hidden"], norm_epsilon(module))

    # -------------------------------------------------------------------------------------------------- Lagrangian
    def set_progress(self, step: int, total_steps: int) -> None:
        """Tell the target warm-up where training is."""
        self.step, self.total_steps = int(step), max(int(total_steps), 1)

    def current_targets(self) -> dict[str, float]:
        """The warmed-up target sparsity of every structure at the current step."""
        return {
            name: warmup_target(
                self.plan.target_sparsity(name), self.step, self.total_steps, self.config.lagrangian_warmup
            )
            for name in self.plan.structures
        }

    def penalty(self) -> torch.Tensor:
        """The Lagrangian at the current step (differentiable in the gate logits and the multipliers)."""
        keep = self.gates.keep_probabilities()
        sparsities = {name: expected_sparsity(p) for name, p in keep.items()}
        targets = self.current_targets()
        value = self.lagrangian.penalty(sparsities, targets)
        metrics = {f"shear/expected/{k}": v for k, v in expected_shape(keep, self.plan).items()}
        metrics.update({f"shear/target/{k}": float(v) for k, v in self.plan.target.items()})
        for name, sparsity in sparsities.items():
            metrics[f"shear/expected_sparsity/{name}"] = float(sparsity.detach().mean())
            metrics[f"shear/target_sparsity/{name}"] = targets[name]
        metrics.update({f"shear/{k}": v for k, v in self.lagrangian.values().items()})
        metrics.update({f"shear/binary/{k}": v for k, v in self.gates.binariness().items()})
        metrics["shear/lagrangian"] = float(value.detach())
        self.last_metrics = metrics
        return value

    def finish_gradients(self) -> None:
        """Once per optimiser step, before it: average the gate and multiplier gradients over the processes (the
        LM loss's share; DDP does the same for the weights), then add the Lagrangian's gradient once.

        The LM loss's gradient arrives already normalised by the Trainer over the whole global batch; the Lagrangian
        does not depend on the data, so its gradient is added once, whatever the gradient accumulation, number of
        processes or token averaging. One process: no communication.
        """
        from ..distributed import current

        group = current()
        if group.enabled:
            for param in self.parameters():  # a handful of small fp32 tensors
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                group.all_reduce_(param.grad)
                param.grad /= group.world_size
        self.penalty().backward()

    def broadcast_from_rank_zero(self) -> None:
        """Give every process rank 0's gate logits and multipliers (at the start of training: one source of truth)."""
        from ..distributed import current

        group = current()
        if group.enabled:
            with torch.no_grad():
                for param in self.parameters():
                    group.broadcast_(param.data, src=0)

    def expected_shape(self) -> dict[str, float]:
        """The expected dimensions under the current gate logits."""
        return expected_shape(self.gates.keep_probabilities(), self.plan)

    # --------------------------------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path) -> None:
        """Write the gate logits, multipliers (``shearing_state.safetensors``) and the recipe (``shearing_config.json``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / STATE_FILE), metadata={"format": "pt"})
        self.config.save_pretrained(directory)

    def load(self, directory: str | Path) -> None:
        """Load what :meth:`save` wrote into this module."""
        from safetensors.torch import load_file

        state = load_file(str(Path(directory) / STATE_FILE))
        device = next(iter(self.parameters())).device
        self.load_state_dict({k: v.to(device) for k, v in state.items()})
