"""Where the gated pieces of a LLaMA-like causal LM live, found by structure rather than by model type.

A LLaMA-like model (LLaMA, Mistral, Qwen2, Qwen3, SmolLM, ...) has decoder blocks with ``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm`` and ``post_attention_layernorm`` RMSNorms, a final RMSNorm beside
the blocks, input embeddings and an output head. Norms of the Gemma kind (``1 + weight``) are refused: folding a gate
into them is not a plain rescale.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, vocab_size=10))
    >>> layout = ModelLayout.of(model)
    >>> layout.blocks_name, len(layout.blocks)
    ('model.layers', 2)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..modeling import find_decoder_blocks

__all__ = ["ModelLayout", "UnsupportedModelError"]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")


class UnsupportedModelError(ValueError):
    """The model is not LLaMA-like in the way Sheared-LLaMA gating needs.

    Example:
        >>> raise UnsupportedModelError("no self_attn.q_proj")  # doctest: +SKIP
    """


def _check_rms_norm(name: str, module: nn.Module) -> None:
    if "gemma" in type(module).__name__.lower() or not hasattr(module, "weight"):
        raise UnsupportedModelError(f"{name} ({type(module).__name__}) is not a plain RMSNorm (weight * x / rms)")
    if getattr(module, "bias", None) is not None:
        raise UnsupportedModelError(f"{name} ({type(module).__name__}) has a bias: LayerNorm is not supported")


def norm_epsilon(module: nn.Module) -> float:
    """The epsilon of an RMSNorm (``variance_epsilon`` in LLaMA-like code, ``eps`` elsewhere)."""
    for attr in ("variance_epsilon", "eps"):
        if hasattr(module, attr):
            return float(getattr(module, attr))
    raise UnsupportedModelError(f"{type(module).__name__} has no variance_epsilon/eps attribute")


@dataclass
class ModelLayout:
    """Handles on the pieces of a LLaMA-like causal LM.

    Attributes:
        blocks_name: Dotted name of the decoder-block list (e.g. ``"model.layers"``).
        blocks: The decoder blocks.
        embed: The input embedding.
        final_norm: The RMSNorm after the last block.
        lm_head: The output projection.
    """

    blocks_name: str
    blocks: nn.ModuleList
    embed: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Linear

    @classmethod
    def of(cls, model: nn.Module) -> ModelLayout:
        """Find the layout of ``model``.

        Raises:
            UnsupportedModelError: naming the first piece that is missing.
        """
        if getattr(getattr(model, "config", None), "model_type", "").startswith("gemma"):
            raise UnsupportedModelError("Gemma models use (1 + weight) norms and are not supported by Sheared-LLaMA")
        blocks_name, blocks = find_decoder_blocks(model)
        for index, block in enumerate(blocks):
            for path in [f"self_attn.{n}" for n in ATTENTION] + [f"mlp.{n}" for n in MLP] + list(BLOCK_NORMS):
                try:
                    module = block.get_submodule(path)
                except AttributeError:
                    raise UnsupportedModelError(
                        f"{blocks_name}.{index} has no {path}: not a LLaMA-like block"
                    ) from None
                if path in BLOCK_NORMS:
                    _check_rms_norm(f"{blocks_name}.{index}.{path}", module)
        parent_name = blocks_name.rsplit(".", 1)[0] if "." in blocks_name else ""
        parent = model.get_submodule(parent_name)
        final_norm = getattr(parent, "norm", None)
        if final_norm is None:
            raise UnsupportedModelError(f"{parent_name or 'model'} has no final 'norm' beside its blocks")
        _check_rms_norm(f"{parent_name}.norm", final_norm)
        embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
        if not isinstance(embed, nn.Embedding) or not isinstance(lm_head, nn.Linear):
            raise UnsupportedModelError("expected nn.Embedding input embeddings and an nn.Linear output head")
        return cls(blocks_name=blocks_name, blocks=blocks, embed=embed, final_norm=final_norm, lm_head=lm_head)

    @staticmethod
    def attn(block: nn.Module, name: str) -> nn.Linear:
        """``block.self_attn.<name>``."""
        return getattr(block.self_attn, name)

    @staticmethod
    def mlp(block: nn.Module, name: str) -> nn.Linear:
        """``block.mlp.<name>``."""
        return getattr(block.mlp, name)

    def norms(self) -> list[nn.Module]:
        """Every RMSNorm on the residual stream: two per block plus the final one."""
        return [getattr(block, n) for block in self.blocks for n in BLOCK_NORMS] + [self.final_norm]
