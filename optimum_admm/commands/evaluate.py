"""``optimum-cli admm evaluate``: the perplexity of a (pruned) causal LM."""

from __future__ import annotations

import argparse
import json
from typing import Any

from optimum.commands.base import CommandInfo

from ._arguments import (
    _NAMED_DATASETS,
    _dataset,
    _dataset_key,
    _positive_int,
    _texts,
    add_placement_arguments,
)
from ._boundary import GuardedCommand, add_debug_flag

__all__ = ["EvaluateCommand"]


class EvaluateCommand(GuardedCommand):
    """``admm evaluate``: perplexity of a (pruned) model."""

    COMMAND = CommandInfo(
        name="evaluate", help="Measure the perplexity (and lm-eval tasks) of a (pruned) causal LM, against a baseline."
    )

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
        add_placement_arguments(parser)
        parser.add_argument("--json", action="store_true", help="Print the result as one JSON object.")
        parser.add_argument(
            "--tasks",
            default=None,
            help="Also run these lm-eval tasks, comma-separated (e.g. arc_easy,hellaswag; needs lm-eval).",
        )
        parser.add_argument("--limit", type=_positive_int, default=None, help="lm-eval: examples per task.")
        parser.add_argument(
            "--baseline",
            default=None,
            metavar="DENSE_MODEL",
            help="Evaluate this (dense) model too, with the same settings, and report both and the change.",
        )

    def _load(self, name: str) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..loading import explained_load_errors

        args = self.args
        with explained_load_errors(name, "--model" if name == args.model else "--baseline"):
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(
                name,
                dtype="auto",
                device_map=args.device_map,
                use_safetensors=True,
                **({"offload_folder": args.offload_folder} if args.offload_folder is not None else {}),
            ).eval()
        return model, tokenizer

    def _measure(self, name: str) -> dict[str, Any]:
        from ..evaluation import perplexity

        args = self.args
        model, tokenizer = self._load(name)
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
        measured: dict[str, Any] = {"model": name, "dataset": _dataset_key(args.dataset), **result.to_dict()}
        if args.tasks:
            from ..lm_eval_bridge import evaluate_tasks

            tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
            measured["tasks"] = evaluate_tasks(model, tokenizer, tasks, limit=args.limit)
        return measured

    def execute(self) -> None:
        from ..calibration import read_text_file
        from ..loading import check_model_source

        args = self.args
        check_model_source(args.model, parameter="--model")  # before anything is downloaded or loaded
        if args.baseline is not None:
            check_model_source(args.baseline, parameter="--baseline")
        if args.dataset not in _NAMED_DATASETS:
            read_text_file(args.dataset, "--dataset")  # decodable, before the model is loaded
        if args.tasks is not None and not [t for t in args.tasks.split(",") if t.strip()]:
            self.parser.error(f"argument --tasks: {args.tasks!r} names no task")
        results = [self._measure(args.model)]
        if args.baseline is not None:
            results.append(self._measure(args.baseline))
        if args.json:
            out = dict(results[0])
            if len(results) > 1:
                out["baseline"] = results[1]
            print(json.dumps(out))
            return
        for label, measured in zip(("", "baseline "), results, strict=False):
            which = f" [{measured['model']}]" if label else ""
            print(
                f"{label}perplexity on {measured['dataset']}: {measured['perplexity']:.4f} "
                f"({measured['num_tokens']} tokens, {measured['num_windows']} windows of {measured['sequence_length']})"
                f"{which}"
            )
            for task, metrics in measured.get("tasks", {}).items():
                print(f"  {label}{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        if len(results) > 1:
            change = results[0]["perplexity"] / results[1]["perplexity"] - 1
            print(f"perplexity change against the baseline: {change:+.1%}")
