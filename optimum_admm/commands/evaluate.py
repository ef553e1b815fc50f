"""``optimum-cli admm evaluate``: the perplexity of a (pruned) causal LM."""

from __future__ import annotations

import argparse
import json

from optimum.commands.base import CommandInfo

from ._arguments import (
    _NAMED_DATASETS,
    _dataset,
    _dataset_key,
    _device_map,
    _positive_int,
    _texts,
)
from ._boundary import GuardedCommand, add_debug_flag

__all__ = ["EvaluateCommand"]


class EvaluateCommand(GuardedCommand):
    """``admm evaluate``: perplexity of a (pruned) model."""

    COMMAND = CommandInfo(name="evaluate", help="Measure the perplexity of a (pruned) causal LM.")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        add_debug_flag(parser)
        parser.add_argument("--model", required=True, help="Hub id or local directory of the model.")
        parser.add_argument(
            "--dataset",
            type=_dataset,
            default="wikitext2",
            help="'wikitext2' (default), 'c4' or a local text file.",
        )
        parser.add_argument("--sequence-length", type=_positive_int, default=2048, help="Window length (2048).")
        parser.add_argument("--max-tokens", type=_positive_int, default=None, help="Evaluate the first N tokens.")
        parser.add_argument("--batch-size", type=_positive_int, default=1, help="Windows per forward pass (1).")
        parser.add_argument(
            "--device-map",
            type=_device_map,
            default=None,
            help="accelerate device map: 'auto', 'balanced', 'cpu', 'cuda:0' or a JSON object {module: device}.",
        )
        parser.add_argument(
            "--offload-folder", default=None, help="Where a device map's 'disk' modules are offloaded."
        )
        parser.add_argument("--json", action="store_true", help="Print the result as one JSON object.")

    def execute(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..calibration import read_text_file
        from ..evaluation import perplexity
        from ..loading import check_model_source, explained_load_errors

        args = self.args
        check_model_source(args.model, parameter="--model")  # before anything is downloaded or loaded
        if args.dataset not in _NAMED_DATASETS:
            read_text_file(args.dataset, "--dataset")  # decodable, before the model is loaded
        with explained_load_errors(args.model, "--model"):
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            model = AutoModelForCausalLM.from_pretrained(
                args.model,
                dtype="auto",
                device_map=args.device_map,
                use_safetensors=True,
                **({"offload_folder": args.offload_folder} if args.offload_folder is not None else {}),
            ).eval()
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        sequence_length = min(args.sequence_length, limit) if isinstance(limit, int) else args.sequence_length
        result = perplexity(
            model,
            tokenizer,
            _texts(args.dataset),
            sequence_length=sequence_length,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
        )
        if args.json:
            print(json.dumps({"model": args.model, "dataset": _dataset_key(args.dataset), **result.to_dict()}))
        else:
            print(
                f"perplexity on {_dataset_key(args.dataset)}: {result.perplexity:.4f} "
                f"({result.num_tokens} tokens, {result.num_windows} windows of {result.sequence_length})"
            )
