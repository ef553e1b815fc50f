"""``optimum-cli admm shear``: Sheared-LLaMA targeted structured pruning to a smaller standard model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from optimum.commands.base import CommandInfo

from ._arguments import (
    _NAMED_DATASETS,
    _dataset,
    _dataset_key,
    _positive_float,
    _positive_int,
    _texts,
    push_saved_output,
)
from ._boundary import GuardedCommand, add_debug_flag

__all__ = ["ShearCommand"]


def _target_config(text: str) -> str:
    """``--target-config``: an existing JSON file or ``key=value[,key=value...]`` (the keys are checked in run())."""
    if Path(text).is_file() or "=" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither an existing JSON file nor 'key=value[,key=value...]' (such as 'num_hidden_layers=24')"
    )


def _inline_value(key: str, value: str, annotation: str) -> Any:
    """One inline ``key=value`` converted to the type of the ShearingConfig field ``key``."""
    if annotation.startswith("int"):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not an integer") from None
    if annotation == "float":
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a number") from None
    if annotation == "bool":
        if value.lower() not in ("true", "false"):
            raise ValueError(f"{key}={value!r} is invalid; allowed: true or false")
        return value.lower() == "true"
    if annotation.startswith("list"):
        return value.split("+")  # structures=layer+head+intermediate
    return value


def _shearing_config(text: str) -> Any:
    """The :class:`~optimum_admm.structured.ShearingConfig` of a ``--target-config`` argument.

    ``text`` is a JSON file (ShearingConfig fields, e.g. a saved ``shearing_config.json``, or a transformers
    ``config.json`` of the target shape, of which only the five shape fields are used) or inline
    ``key=value[,key=value...]``. Raises ``ValueError`` naming the bad key or value and the allowed keys.
    """
    import dataclasses

    from ..structured.configuration import SHAPE_FIELDS, ShearingConfig

    fields = {f.name: str(f.type) for f in dataclasses.fields(ShearingConfig)}
    allowed = f"allowed keys: {', '.join(fields)}"
    path = Path(text)
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{text!r} is not a JSON file ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{text!r} does not hold a JSON object")
        if "model_type" in data or "architectures" in data:  # a transformers config.json of the target shape
            shape = {name: data[name] for name in SHAPE_FIELDS if data.get(name) is not None}
            if "num_key_value_heads" not in shape and "num_attention_heads" in shape:
                shape["num_key_value_heads"] = shape["num_attention_heads"]  # what transformers assumes (no GQA)
            if not shape:
                raise ValueError(f"{text!r} is a model config without any of {', '.join(SHAPE_FIELDS)}")
            return ShearingConfig(**shape)
        if data.get("method", "sheared_llama") != "sheared_llama":
            raise ValueError(f"{text!r} is a {data['method']!r} recipe, not a Sheared-LLaMA one")
        try:  # a recipe a user wrote (or ShearingConfig.to_json()): an unknown key is a typo, refused
            return ShearingConfig.from_dict(data, strict=True)
        except ValueError as err:
            raise ValueError(f"{text!r}: {err} (or give a transformers config.json of the target shape)") from None
    values: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"{item.strip()!r} is not key=value; {allowed}")
        if key not in fields:
            raise ValueError(f"unknown key {key!r}; {allowed}")
        if key in values:
            raise ValueError(f"{key!r} is given twice")
        values[key] = _inline_value(key, value, fields[key])
    return ShearingConfig(**values)


class ShearCommand(GuardedCommand):
    """``admm shear``: Sheared-LLaMA targeted structured pruning to a smaller standard model."""

    COMMAND = CommandInfo(
        name="shear", help="Prune a LLaMA-like causal LM to a target shape with Sheared-LLaMA and save it."
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        add_debug_flag(parser)
        parser.add_argument("--model", required=True, help="Hub id or local directory of the source model.")
        parser.add_argument(
            "--target-config",
            type=_target_config,
            required=True,
            metavar="JSON_OR_KEY=VALUE",
            help="The target shape: a JSON file (ShearingConfig fields, e.g. a shearing_config.json, or a "
            "transformers config.json of the target shape) or 'key=value[,key=value...]' such as "
            "'num_hidden_layers=24,intermediate_size=1024'. Keys: num_hidden_layers, hidden_size, "
            "num_attention_heads, num_key_value_heads, intermediate_size and the other ShearingConfig fields.",
        )
        parser.add_argument(
            "--dataset",
            type=_dataset,
            required=True,
            help="Training data: 'wikitext2', 'c4' or a local text file (one document).",
        )
        parser.add_argument("--steps", type=_positive_int, required=True, help="Optimiser steps of the pruning phase.")
        parser.add_argument("--sequence-length", type=_positive_int, default=512, help="Tokens per sequence (512).")
        parser.add_argument(
            "--max-sequences", type=_positive_int, default=None, help="Use at most this many sequences (all)."
        )
        parser.add_argument("--batch-size", type=_positive_int, default=8, help="Sequences per step and device (8).")
        parser.add_argument(
            "--learning-rate", type=_positive_float, default=1e-4, help="Weights' learning rate (1e-4)."
        )
        parser.add_argument(
            "--gradient-accumulation-steps", type=_positive_int, default=1, help="Batches per optimiser step (1)."
        )
        parser.add_argument("--logging-steps", type=_positive_int, default=10, help="Log every N steps (10).")
        parser.add_argument("--seed", type=int, default=0, help="Seed of the Trainer (0).")
        parser.add_argument("--output", required=True, help="Directory to save the sheared model to.")
        parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output directory.")
        parser.add_argument(
            "--eval-dataset",
            type=_dataset,
            default=None,
            help="Measure the sheared model's perplexity on this dataset and record it in the card (default: skip).",
        )
        parser.add_argument(
            "--eval-max-tokens", type=_positive_int, default=None, help="Evaluate only the first N tokens."
        )
        parser.add_argument("--base-model", default=None, help="Hub id of the source model, for the model card.")
        parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="Also push to this Hub repo.")
        parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
        parser.add_argument("--revision", default=None, help="Branch of the Hub repo to push to (default: main).")
        parser.add_argument(
            "--trust-remote-code", action="store_true", help="Allow custom model code from the Hub (off by default)."
        )
        parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")

    def _check(self) -> tuple[Any, Any]:
        """Everything that can be checked before loading weights: the recipe, --output, the source config."""
        from transformers import AutoConfig

        from ..export import check_save_dir

        args = self.args
        try:
            config = _shearing_config(args.target_config)
        except (TypeError, ValueError) as err:
            self.parser.error(f"argument --target-config: {err}")
        try:
            check_save_dir(args.output, args.overwrite)
        except ValueError as err:
            self.parser.error(f"argument --output: {err}")
        if args.push_to_hub is not None:
            from ..hub import check_push_arguments, require_token

            try:
                check_push_arguments(args.push_to_hub, revision=args.revision)
            except ValueError as err:
                self.parser.error(f"argument --push-to-hub: {err}")
            require_token(parameter="--push-to-hub")
        try:
            model_config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as err:
            self.parser.error(f"argument --model: cannot load the config of {args.model!r}: {err}")
        try:
            plan = config.plan(model_config)
        except ValueError as err:
            self.parser.error(f"argument --target-config: {err}")
        limit = getattr(model_config, "max_position_embeddings", None)
        if isinstance(limit, int) and args.sequence_length > limit:
            self.parser.error(
                f"argument --sequence-length: {args.sequence_length} exceeds the model's max_position_embeddings={limit}"
            )
        return config, plan

    def execute(self) -> None:
        args = self.args
        config, plan = self._check()

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..calibration import load_named_texts
        from ..distributed import current
        from ..structured.api import _count_parameters, pack_tokens, shear

        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        if args.dataset in _NAMED_DATASETS:
            texts = [text for text in load_named_texts(args.dataset) if text.strip()]
        else:
            texts = [Path(args.dataset).read_text(encoding="utf-8")]
        try:
            data = pack_tokens(texts, tokenizer, args.sequence_length, args.max_sequences)
        except ValueError as err:
            self.parser.error(f"argument --dataset: {_dataset_key(args.dataset)}: {err}")
        print(
            f"training data: {len(data)} sequences of {args.sequence_length} tokens from {_dataset_key(args.dataset)}"
        )

        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code
        )
        result = shear(
            model,
            config,
            data,
            max_steps=args.steps,
            learning_rate=args.learning_rate,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            logging_steps=args.logging_steps,
            seed=args.seed,
            disable_tqdm=args.no_progress,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        if not current().is_main:
            return  # every rank holds the same gates and weights: rank 0 evaluates, saves and pushes
        evaluation = None
        if args.eval_dataset is not None:
            from ..evaluation import perplexity

            measured = perplexity(
                result.model.eval(),
                tokenizer,
                _texts(args.eval_dataset),
                sequence_length=args.sequence_length,
                max_tokens=args.eval_max_tokens,
                show_progress=not args.no_progress,
            )
            evaluation = {_dataset_key(args.eval_dataset): measured}
            print(f"perplexity on {_dataset_key(args.eval_dataset)}: {measured.perplexity:.4f}")
        base_model = args.base_model
        if base_model is None and not Path(args.model).exists():
            base_model = args.model
        target = result.save_pretrained(
            args.output,
            tokenizer=tokenizer,
            overwrite=args.overwrite,
            evaluation_results=evaluation,
            base_model=base_model,
            repo_id=args.push_to_hub,
        )
        after = _count_parameters(result.model)
        before = result.source_parameters or after
        shape = ", ".join(f"{name} {plan.source[name]} -> {plan.target[name]}" for name in plan.source)
        print(f"shape: {shape}")
        print(f"parameters: {before:,} -> {after:,} ({after / before:.1%})")
        print(f"saved to {target}")
        push_saved_output(args, target, "sheared")
