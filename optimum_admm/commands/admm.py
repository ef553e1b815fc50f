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

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

__all__ = ["ADMMCommand", "EvaluateCommand", "PruneCommand", "ShearCommand"]

_NAMED_DATASETS = ("wikitext2", "c4")


class _RegisteredMethods:
    """argparse ``choices`` that read :func:`optimum_admm.registry.registered_methods` only when first needed."""

    def _names(self) -> list[str]:
        from ..registry import registered_methods

        return sorted(registered_methods())

    def __contains__(self, item: object) -> bool:
        return item in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: an integer >= 1")
    return value


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; allowed: a number in [0, 1)")
    return value


def _pattern(text: str) -> str:
    from ..configuration import parse_nm

    try:
        nm = parse_nm(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"


def _dataset(text: str) -> str:
    if text in _NAMED_DATASETS or Path(text).is_file():
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a named dataset ({', '.join(_NAMED_DATASETS)}) nor an existing text file"
    )


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing file")
    return text


def _dataset_key(dataset: str) -> str:
    """The name a dataset argument is recorded under (a file is recorded by its file name, never its path)."""
    return dataset if dataset in _NAMED_DATASETS else Path(dataset).name


def _texts(dataset: str) -> Any:
    """What :func:`optimum_admm.evaluation.perplexity` takes: a named benchmark, or a file's text as a list."""
    return dataset if dataset in _NAMED_DATASETS else [Path(dataset).read_text(encoding="utf-8")]


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: a finite number > 0")
    return value


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
        if "method" in data or "optimum_admm_version" in data:  # written by ShearingConfig.to_json()
            if data.get("method", "sheared_llama") != "sheared_llama":
                raise ValueError(f"{text!r} is a {data['method']!r} recipe, not a Sheared-LLaMA one")
            return ShearingConfig.from_dict(data)
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{text!r} has unknown keys {unknown}; {allowed} (or a transformers config.json)")
        return ShearingConfig(**data)
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


def _count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once


class PruneCommand(BaseOptimumCLICommand):
    """``admm prune``: prune a causal LM, save it (and optionally push it to the Hub)."""

    COMMAND = CommandInfo(name="prune", help="Prune a causal LM with ADMM (or another registered method) and save it.")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="Hub id or local directory of the dense model.")
        parser.add_argument(
            "--method",
            default=None,
            choices=_RegisteredMethods(),
            metavar="METHOD",
            help="A pruning method registered in optimum_admm.registry (default: admm, or the --recipe's).",
        )
        parser.add_argument("--sparsity", type=_sparsity, default=None, help="Fraction of zeros, in [0, 1).")
        parser.add_argument(
            "--pattern", type=_pattern, default=None, help="'unstructured' (default) or 'N:M' such as '2:4'."
        )
        parser.add_argument(
            "--dataset",
            type=_dataset,
            default="wikitext2",
            help="Calibration data: 'wikitext2', 'c4' or a local text file (default: wikitext2).",
        )
        parser.add_argument("--num-samples", type=_positive_int, default=None, help="Calibration windows (128).")
        parser.add_argument("--sequence-length", type=_positive_int, default=None, help="Tokens per window (2048).")
        parser.add_argument("--seed", type=int, default=None, help="Seed for the calibration windows (0).")
        parser.add_argument(
            "--recipe",
            type=_existing_file,
            default=None,
            help="A pruning_config.json to start from (every setting of a saved run); flags override it.",
        )
        parser.add_argument("--output", required=True, help="Directory to save the pruned model to.")
        parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output directory.")
        parser.add_argument("--save-masks", action="store_true", help="Also save bit-packed masks.safetensors.")
        parser.add_argument("--max-shard-size", default="5GB", help="Safetensors shard size (default: 5GB).")
        parser.add_argument(
            "--eval-dataset",
            type=_dataset,
            default=None,
            help="Measure perplexity on this dataset after pruning and record it in the card (default: skip).",
        )
        parser.add_argument(
            "--eval-max-tokens", type=_positive_int, default=None, help="Evaluate only the first N tokens."
        )
        parser.add_argument("--base-model", default=None, help="Hub id of the dense model, for the model card.")
        parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="Also push to this Hub repo.")
        parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
        parser.add_argument("--revision", default=None, help="Branch of the Hub repo to push to (default: main).")
        parser.add_argument("--device-map", default=None, help="Passed to from_pretrained ('auto', 'cpu', ...).")
        parser.add_argument("--torch-dtype", default="auto", help="Weights dtype (default: as stored).")
        parser.add_argument(
            "--trust-remote-code", action="store_true", help="Allow custom model code from the Hub (off by default)."
        )
        parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
        large = parser.add_argument_group("large models", "See docs/large-models.md.")
        large.add_argument(
            "--checkpoint-dir",
            metavar="DIR",
            default=None,
            help="Record every finished block there; re-running the same command after an interruption continues "
            "from the next block (a different recipe, model or calibration set is refused).",
        )
        large.add_argument(
            "--max-memory",
            metavar="SIZE",
            default=None,
            help="Budget for the calibration activations kept in RAM between blocks ('8GiB', '8GB' or bytes); "
            "one that cannot hold them is refused, with the numbers, before any forward.",
        )
        large.add_argument(
            "--activation-cache-dir",
            metavar="DIR",
            default=None,
            help="Keep the calibration activations in memory-mapped files in this directory instead of RAM "
            "(nothing is left behind; its free space is checked first).",
        )
        large.add_argument(
            "--streaming",
            action="store_true",
            help="Prune a safetensors checkpoint (a local directory, or a Hub id whose safetensors and JSON/"
            "tokenizer files are downloaded) block by block, never holding the whole model in memory.",
        )
        large.add_argument(
            "--execution-device",
            default=None,
            help="With --streaming: where each block is loaded and computed (default: cpu; e.g. cuda:0).",
        )

    def _config(self) -> Any:
        from ..configuration import PruningConfig
        from ..registry import config_class_for

        args = self.args
        base: dict[str, Any] = {}
        if args.recipe is not None:
            data = json.loads(Path(args.recipe).read_text(encoding="utf-8"))
            base = dict(data.get("config", data))
        method = args.method or base.get("method") or "admm"
        if base.get("method", method) != method:
            base = {}  # another method's recipe: only the shared settings given as flags apply
        flags = {
            "sparsity": args.sparsity,
            "mask_structure": args.pattern,
            "num_samples": args.num_samples,
            "sequence_length": args.sequence_length,
            "seed": args.seed,
        }
        values = {**base, **{k: v for k, v in flags.items() if v is not None}}
        if args.pattern is not None and args.sparsity is None:
            values.pop("sparsity", None)  # let the N:M pattern imply it
        values["method"] = method
        config_class_for(method)  # an unknown method in a recipe fails here, naming it
        return PruningConfig.from_dict(values)

    def run(self) -> None:
        from ..export import _check_max_shard_size, check_save_dir, save_pruned
        from ..hub import check_push_arguments

        args = self.args
        try:
            config = self._config()
            check_save_dir(args.output, args.overwrite)
            _check_max_shard_size(args.max_shard_size)
            if args.push_to_hub is not None:
                check_push_arguments(args.push_to_hub, revision=args.revision)
        except ValueError as err:
            self.parser.error(str(err))
        max_memory = self._check_large_model_arguments()
        if args.streaming:
            self._run_streaming(config, max_memory)
            return

        from ..pruner import ADMMPruner

        pruner = ADMMPruner.from_pretrained(
            args.model,
            config=config,
            torch_dtype=args.torch_dtype,
            device_map=args.device_map,
            trust_remote_code=args.trust_remote_code,
        )
        try:
            report = pruner.prune(
                calibration_dataset=args.dataset,
                show_progress=not args.no_progress,
                max_memory=max_memory,
                checkpoint_dir=args.checkpoint_dir,
                activation_cache_dir=args.activation_cache_dir,
            )
        except ValueError as err:  # a checkpoint of another run, a budget or disk too small: stated with the numbers
            _fail(str(err))
        print(report.summary(max_rows=20))
        evaluation = None
        if args.eval_dataset is not None:
            from ..evaluation import perplexity

            result = perplexity(
                pruner.model,
                pruner.tokenizer,
                _texts(args.eval_dataset),
                sequence_length=report.calibration.get("sequence_length", config.sequence_length),
                max_tokens=args.eval_max_tokens,
            )
            evaluation = {_dataset_key(args.eval_dataset): result}
            print(f"perplexity on {_dataset_key(args.eval_dataset)}: {result.perplexity:.4f}")
        base_model = args.base_model
        if base_model is None and not Path(args.model).exists():
            base_model = args.model
        path = save_pruned(
            pruner.model,
            pruner.tokenizer,
            pruner.config,
            report,
            args.output,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            save_masks=args.save_masks,
            evaluation_results=evaluation,
            base_model=base_model,
            repo_id=args.push_to_hub,
        )
        print(f"saved to {path}")
        self._push(path)

    def _check_large_model_arguments(self) -> int | str | None:
        """Check --checkpoint-dir, --max-memory, --activation-cache-dir, --streaming and the options it excludes,
        before anything is loaded; returns the --max-memory value for ``max_memory=``."""
        args = self.args
        max_memory: int | str | None = None
        if args.max_memory is not None:
            from ..memory import parse_size

            text = args.max_memory.strip()
            max_memory = int(text) if text.isdigit() else text
            try:
                parse_size("max_memory", max_memory, args.max_memory, "bytes or a size such as '8GiB' or '8GB'")
            except ValueError as err:
                self.parser.error(f"argument --max-memory: {err}")
        if args.activation_cache_dir is not None:
            from ..activations import resolve_storage

            try:
                resolve_storage("cpu", args.activation_cache_dir)
            except ValueError as err:
                self.parser.error(f"argument --activation-cache-dir: {err}")
            if max_memory is not None:
                self.parser.error(
                    "argument --max-memory: not allowed with --activation-cache-dir (the budget is for activations "
                    "in RAM; on disk, the free space of the file system is checked instead)"
                )
        output = Path(args.output).resolve()
        if args.checkpoint_dir is not None:
            checkpoint = Path(args.checkpoint_dir)
            if checkpoint.exists() and not checkpoint.is_dir():
                self.parser.error(f"argument --checkpoint-dir: {args.checkpoint_dir!r} exists and is not a directory")
            if checkpoint.resolve() == output or output in checkpoint.resolve().parents:
                self.parser.error("argument --checkpoint-dir: must not be --output or inside it (it is replaced)")
        if not args.streaming:
            if args.execution_device is not None:
                self.parser.error("argument --execution-device: applies only with --streaming")
            return max_memory
        excluded = {
            "--device-map": args.device_map is not None,
            "--torch-dtype": args.torch_dtype != "auto",
            "--save-masks": args.save_masks,
            "--max-shard-size": args.max_shard_size != "5GB",
            "--trust-remote-code": args.trust_remote_code,
        }
        conflicts = [flag for flag, given in excluded.items() if given]
        if conflicts:
            self.parser.error(
                f"argument --streaming: not allowed with {', '.join(conflicts)} (streaming reads the checkpoint's "
                "tensors as stored, in their dtype, with the standard transformers classes, and writes one shard "
                "per block; prune without --streaming to use them)"
            )
        import torch

        try:
            torch.device(args.execution_device or "cpu")
        except (RuntimeError, ValueError) as err:
            self.parser.error(f"argument --execution-device: {args.execution_device!r} is not a device ({err})")
        model = Path(args.model)
        if model.exists():
            from ..streaming import checkpoint_weight_map

            if not model.is_dir():
                self.parser.error(f"argument --model: {args.model!r} is not a directory (--streaming)")
            try:
                checkpoint_weight_map(model)
            except (OSError, ValueError) as err:
                self.parser.error(f"argument --model: {err}")
            if model.resolve() == output:
                self.parser.error("argument --output: must not be the --model directory (--streaming)")
        else:
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(args.model)
            except ValueError as err:
                self.parser.error(f"argument --model: neither a local directory nor a Hub id ({err})")
        return max_memory

    def _run_streaming(self, config: Any, max_memory: int | str | None) -> None:
        """``--streaming``: :func:`optimum_admm.streaming.prune_checkpoint` from a local or downloaded checkpoint."""
        from ..export import PRUNING_CONFIG_NAME, pruning_metadata
        from ..streaming import checkpoint_weight_map, prune_checkpoint

        args = self.args
        source = Path(args.model)
        if not source.exists():
            from huggingface_hub import snapshot_download

            try:  # safetensors weights, the config and the tokenizer files; never pickled .bin weights
                source = Path(
                    snapshot_download(args.model, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt"])
                )
                checkpoint_weight_map(source)
            except (OSError, ValueError) as err:
                _fail(f"--model {args.model}: {err}")
        try:
            result = prune_checkpoint(
                source,
                args.output,
                config,
                args.dataset,
                execution_device=args.execution_device or "cpu",
                max_memory=max_memory,
                overwrite=args.overwrite,
                show_progress=not args.no_progress,
                checkpoint_dir=args.checkpoint_dir,
                activation_cache_dir=args.activation_cache_dir,
            )
        except ValueError as err:  # a checkpoint of another run, a budget or disk too small: stated with the numbers
            _fail(str(err))
        report = result.report
        if report is not None and hasattr(report, "summary"):
            print(report.summary(max_rows=20))
        print(
            f"streamed: load {result.load_seconds:.1f} s, compute {result.compute_seconds:.1f} s, "
            f"write {result.write_seconds:.1f} s"
        )
        path = result.save_dir.resolve()
        evaluation = None
        if args.eval_dataset is not None:  # the saved output, loaded whole: the same numbers as without --streaming
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from ..evaluation import perplexity

            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
            length = (report.calibration if report is not None else {}).get("sequence_length", config.sequence_length)
            measured = perplexity(
                model,
                AutoTokenizer.from_pretrained(path),
                _texts(args.eval_dataset),
                sequence_length=length,
                max_tokens=args.eval_max_tokens,
            )
            del model
            evaluation = {_dataset_key(args.eval_dataset): measured}
            print(f"perplexity on {_dataset_key(args.eval_dataset)}: {measured.perplexity:.4f}")
        # The sidecar (now with the evaluation) and the model card, as save_pruned writes them.
        from ..card import build_model_card

        metadata = pruning_metadata(config, report, evaluation)
        _write_text(path / PRUNING_CONFIG_NAME, json.dumps(metadata, indent=2) + "\n")
        base_model = args.base_model
        if base_model is None and not Path(args.model).exists():
            base_model = args.model
        source_config = SimpleNamespace(_name_or_path=args.model)  # what model.config holds without --streaming
        card = build_model_card(metadata, model_config=source_config, base_model=base_model, repo_id=args.push_to_hub)
        _write_text(path / "README.md", str(card))
        print(f"saved to {path}")
        self._push(path)

    def _push(self, path: Path) -> None:
        args = self.args
        if args.push_to_hub is None:
            return
        from ..hub import push_folder_to_hub

        try:
            info = push_folder_to_hub(
                path, args.push_to_hub, private=True if args.private else None, revision=args.revision
            )
        except PermissionError as err:
            _fail(str(err))
        print(f"pushed to {args.push_to_hub}: {getattr(info, 'commit_url', info)}")


def _write_text(path: Path, text: str) -> None:
    """Write beside ``path`` and rename into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class EvaluateCommand(BaseOptimumCLICommand):
    """``admm evaluate``: perplexity of a (pruned) model."""

    COMMAND = CommandInfo(name="evaluate", help="Measure the perplexity of a (pruned) causal LM.")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
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
        parser.add_argument("--device-map", default=None, help="Passed to from_pretrained ('auto', 'cpu', ...).")
        parser.add_argument("--json", action="store_true", help="Print the result as one JSON object.")

    def run(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..evaluation import perplexity

        args = self.args
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto", device_map=args.device_map).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
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


class ShearCommand(BaseOptimumCLICommand):
    """``admm shear``: Sheared-LLaMA targeted structured pruning to a smaller standard model."""

    COMMAND = CommandInfo(
        name="shear", help="Prune a LLaMA-like causal LM to a target shape with Sheared-LLaMA and save it."
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
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
        try:
            model_config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as err:
            self.parser.error(f"argument --model: cannot load the config of {args.model!r}: {err}")
        try:
            plan = config.plan(model_config)
        except ValueError as err:
            self.parser.error(f"argument --target-config: {err}")
        if plan.target == plan.source:
            self.parser.error(
                f"argument --target-config: the target equals the source shape {plan.source}; nothing to prune"
            )
        limit = getattr(model_config, "max_position_embeddings", None)
        if isinstance(limit, int) and args.sequence_length > limit:
            self.parser.error(
                f"argument --sequence-length: {args.sequence_length} exceeds the model's max_position_embeddings={limit}"
            )
        return config, plan

    def run(self) -> None:
        args = self.args
        config, plan = self._check()

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..calibration import load_named_texts
        from ..structured.api import pack_tokens, shear
        from ..zoo import _make_readable

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
        before = _count_parameters(model)
        target = Path(args.output).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            result = shear(
                model,
                config,
                data,
                max_steps=args.steps,
                output_dir=staging,
                learning_rate=args.learning_rate,
                per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                logging_steps=args.logging_steps,
                seed=args.seed,
                disable_tqdm=args.no_progress,
                dataloader_pin_memory=torch.cuda.is_available(),
            )
            tokenizer.save_pretrained(staging)
            _make_readable(staging)
            if target.exists():  # --overwrite: swap the finished directory in, then drop the old one
                backup = target.with_name(f".{target.name}.old-{os.getpid()}")
                target.rename(backup)
                staging.rename(target)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        after = _count_parameters(result.model)
        shape = ", ".join(f"{name} {plan.source[name]} -> {plan.target[name]}" for name in plan.source)
        print(f"shape: {shape}")
        print(f"parameters: {before:,} -> {after:,} ({after / before:.1%})")
        print(f"saved to {target}")


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
