"""``optimum-cli admm prune``, ``optimum-cli admm evaluate`` and ``optimum-cli admm shear``.

Parsing is light (argparse and optimum's command base classes); torch, transformers, datasets and the pruning code
are imported inside ``run()``. Bad arguments are argparse errors (exit code 2, the argument named, no traceback).
The Hub token is never a command-line argument: it comes from ``HF_TOKEN`` or ``hf auth login``.

Example:
    optimum-cli admm prune --model HuggingFaceTB/SmolLM2-135M --method admm --sparsity 0.6 --pattern unstructured \\
        --dataset wikitext2 --num-samples 128 --sequence-length 2048 --output smollm2-admm-60
    optimum-cli admm prune --model meta-llama/Llama-3.1-8B --streaming --execution-device cuda:0 \\
        --checkpoint-dir ckpt --activation-cache-dir /scratch/activations --output llama-admm-50
    optimum-cli admm evaluate --model smollm2-admm-60 --dataset wikitext2
    optimum-cli admm shear --model HuggingFaceTB/SmolLM2-135M --dataset wikitext2 --steps 3200 \\
        --target-config num_hidden_layers=24,intermediate_size=1024 --output smollm2-sheared
"""

from __future__ import annotations

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from .evaluate import EvaluateCommand
from .prune import PruneCommand
from .shear import ShearCommand

__all__ = ["ADMMCommand", "EvaluateCommand", "PruneCommand", "ShearCommand"]


class ADMMCommand(BaseOptimumCLICommand):
    """``optimum-cli admm``: the group of this library's commands."""

    COMMAND = CommandInfo(
        name="admm",
        help="Prune causal LMs with ADMM (optimum-admm) or shear them to a target shape, and evaluate them.",
    )
    SUBCOMMANDS = (
        CommandInfo(name=PruneCommand.COMMAND.name, help=PruneCommand.COMMAND.help, subcommand_class=PruneCommand),
        CommandInfo(
            name=EvaluateCommand.COMMAND.name, help=EvaluateCommand.COMMAND.help, subcommand_class=EvaluateCommand
        ),
        CommandInfo(name=ShearCommand.COMMAND.name, help=ShearCommand.COMMAND.help, subcommand_class=ShearCommand),
    )
