"""``optimum-cli admm prune``: prune a causal LM (in memory, through a device map, or streamed) and save it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from optimum.commands.base import CommandInfo

from ._arguments import (
    _calibration_dataset,
    _dataset,
    _dataset_key,
    _existing_file,
    _fail,
    _pattern,
    _positive_int,
    _RegisteredMethods,
    _sparsity,
    _texts,
    add_placement_arguments,
    push_saved_output,
)
from ._boundary import GuardedCommand, add_debug_flag

__all__ = ["PruneCommand"]

from ..errors import CalibrationDataError, InvalidArgumentError  # noqa: E402 (light: no torch)


class PruneCommand(GuardedCommand):
    """``admm prune``: prune a causal LM, save it (and optionally push it to the Hub)."""

    COMMAND = CommandInfo(name="prune", help="Prune a causal LM with ADMM (or another registered method) and save it.")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        add_debug_flag(parser)
        parser.add_argument("--model", required=True, help="Hub id or local directory of the dense model.")
        parser.add_argument(
            "--method",
            default=None,
            choices=_RegisteredMethods(),
            metavar="METHOD",
            help="admm (default, or the --recipe's), sparsegpt, wanda, magnitude, or any method registered in "
            "optimum_admm.registry.",
        )
        parser.add_argument(
            "--preset",
            default=None,
            choices=["paper", "balanced", "fast"],
            help="ADMM's iterations / mask iterations: paper 20/15 (default), balanced 10/8, fast 4/3 (see "
            "benchmarks/results/frontier-smollm2-135m.md).",
        )
        parser.add_argument("--sparsity", type=_sparsity, default=None, help="Fraction of zeros, in [0, 1).")
        parser.add_argument(
            "--pattern", type=_pattern, default=None, help="'unstructured' (default) or 'N:M' such as '2:4'."
        )
        parser.add_argument(
            "--dataset",
            type=_calibration_dataset,
            default="wikitext2",
            help="Calibration data: 'wikitext2' (default), 'c4', a local text file, or any dataset datasets.load_dataset "
            "reads (a Hub dataset id or a directory of data files; see --dataset-config/--dataset-split/--text-column).",
        )
        parser.add_argument("--dataset-config", default=None, help="The --dataset's configuration (Hub datasets).")
        parser.add_argument("--dataset-split", default="train", help="The --dataset's split (default: train).")
        parser.add_argument("--text-column", default="text", help="The --dataset's text column (default: text).")
        parser.add_argument("--num-samples", type=_positive_int, default=None, help="Calibration windows (128).")
        parser.add_argument("--sequence-length", type=_positive_int, default=None, help="Tokens per window (2048).")
        parser.add_argument(
            "--calibration-batch-size",
            type=_positive_int,
            default=None,
            help="Calibration windows run through each block at once (8).",
        )
        parser.add_argument("--seed", type=int, default=None, help="Seed for the calibration windows (0).")
        parser.add_argument(
            "--calibrate-all-experts",
            action="store_true",
            help="Calibrate every mixture-of-experts expert on every token, not only on its routed tokens.",
        )
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
        add_placement_arguments(parser)
        parser.add_argument(
            "--dtype",
            "--torch-dtype",
            dest="torch_dtype",
            default="auto",
            help="Weights dtype: auto (as stored), float32, bfloat16 or float16.",
        )
        parser.add_argument(
            "--trust-remote-code", action="store_true", help="Allow custom model code from the Hub (off by default)."
        )
        parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
        parser.add_argument(
            "--allow-unpruned",
            action="store_true",
            help="Prune even when more than 5%% of the decoder blocks' weights are not targeted linears (they are "
            "named either way; by default that is refused before any work).",
        )
        large = parser.add_argument_group("large models", "See docs/large-models.md.")
        large.add_argument(
            "--checkpoint-dir",
            metavar="DIR",
            default=None,
            help="Record every finished block there; re-running the same command after an interruption continues "
            "from the next block (a different recipe, model or calibration set is refused).",
        )
        large.add_argument(
            "--activation-memory",
            metavar="SIZE",
            default=None,
            help="Budget for the calibration activations kept in RAM between blocks ('8GiB', '8GB' or bytes); "
            "one that cannot hold them is refused, with the numbers, before any forward.",
        )
        large.add_argument("--max-memory", dest="deprecated_max_memory", default=None, help=argparse.SUPPRESS)
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

    def _recipe(self) -> dict[str, Any]:
        """The ``--recipe`` file's settings: JSON or YAML, a ``pruning_config.json`` or a bare recipe."""
        path = Path(self.args.recipe)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidArgumentError(f"--recipe {path} cannot be read as text ({err})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as json_error:
            try:
                import yaml

                data = yaml.safe_load(text)
            except Exception:  # not YAML either: report the JSON reading, which names line and column
                raise InvalidArgumentError(f"--recipe {path} is neither JSON nor YAML ({json_error})") from None
        if not isinstance(data, dict):
            raise InvalidArgumentError(
                f"--recipe {path} holds a {type(data).__name__}; allowed: a mapping of settings"
            )
        recipe = data.get("config", data)
        if not isinstance(recipe, dict):
            raise InvalidArgumentError(f"--recipe {path}: 'config' is not a mapping of settings")
        return dict(recipe)

    def _config(self) -> Any:
        from ..configuration import PruningConfig
        from ..registry import config_class_for

        args = self.args
        base = self._recipe() if args.recipe is not None else {}
        method = args.method or base.get("method") or "admm"
        if base.get("method", method) != method:
            raise InvalidArgumentError(
                f"--recipe {args.recipe} is a {base['method']!r} recipe, but --method is {method!r}; drop one"
            )
        flags = {
            "sparsity": args.sparsity,
            "mask_structure": args.pattern,
            "num_samples": args.num_samples,
            "sequence_length": args.sequence_length,
            "calibration_batch_size": args.calibration_batch_size,
            "seed": args.seed,
            "calibrate_all_experts": True if args.calibrate_all_experts else None,
        }
        preset = {}
        if args.preset is not None:
            from ..configuration import ADMM_PRESETS

            if method != "admm":
                raise InvalidArgumentError(f"--preset {args.preset} is for --method admm; --method is {method!r}")
            preset = ADMM_PRESETS[args.preset]
        values = {**base, **preset, **{k: v for k, v in flags.items() if v is not None}}
        if args.pattern is not None and args.sparsity is None:
            values.pop("sparsity", None)  # let the N:M pattern imply it
        values["method"] = method
        config_class_for(method)  # an unknown method in a recipe fails here, naming it
        try:
            return PruningConfig.from_dict(values, strict=True)  # a typo in a recipe is an error, not a warning
        except ValueError as err:
            raise InvalidArgumentError(f"--recipe {args.recipe}: {err}" if args.recipe else str(err)) from None

    def _check_arguments(self) -> tuple[Any, int | str | None]:
        """Everything that can be checked from the arguments alone; bad ones are argparse errors (exit 2)."""
        from ..export import _check_max_shard_size, check_save_dir
        from ..hub import check_push_arguments

        args = self.args
        try:
            config = self._config()
            check_save_dir(args.output, args.overwrite)
            _check_max_shard_size(args.max_shard_size)
            if args.push_to_hub is not None:
                check_push_arguments(args.push_to_hub, revision=args.revision)
            _torch_dtype(args.torch_dtype)
        except ValueError as err:
            self.parser.error(str(err))
        return config, self._check_large_model_arguments()

    def execute(self) -> None:
        from ..distributed import init_from_environment
        from ..files import check_writable_directory
        from ..loading import check_model_source

        args = self.args
        config, activation_memory = self._check_arguments()
        init_from_environment()  # under torchrun: one process group, every rank prunes its share
        # The environment, before any download or load: the model source, the output, the token, the data files.
        source = check_model_source(args.model, trust_remote_code=args.trust_remote_code, parameter="--model")
        check_writable_directory(args.output, "--output", _checkpoint_bytes(source))
        if args.push_to_hub is not None:
            from ..hub import require_token

            require_token(parameter="--push-to-hub")
        if args.eval_dataset is not None:
            _calibration_texts(args.eval_dataset, "--eval-dataset", load_named=False)
        calibration = None
        if config.needs_calibration:
            calibration = self._calibration_set(config, _calibration_texts(args.dataset, "--dataset", args=args))
        if args.streaming:
            self._run_streaming(config, activation_memory, calibration)
            return
        self._run_in_memory(config, activation_memory, calibration)

    def _calibration_set(self, config: Any, texts: list[str]) -> Any:
        """The calibration windows, from the model's tokenizer and config only (the weights are not loaded yet):
        too little text is refused here, not after the model is loaded."""
        from transformers import AutoConfig, AutoTokenizer

        from ..calibration import CalibrationSet, get_calibration_data, window_length
        from ..loading import explained_load_errors

        args = self.args
        with explained_load_errors(args.model, "--model"):
            tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
            model_config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        try:
            ids = get_calibration_data(
                texts,
                tokenizer,
                config.num_samples,
                window_length(model_config, config.sequence_length),
                seed=config.seed,
                vocab_size=getattr(model_config, "vocab_size", None),
            )
        except CalibrationDataError as err:
            raise CalibrationDataError(f"--dataset {_dataset_key(args.dataset)}: {err}") from None
        return CalibrationSet(ids, _dataset_description(args))

    def _run_in_memory(self, config: Any, activation_memory: int | str | None, calibration: Any) -> None:
        from ..export import save_pruned
        from ..files import check_writable_directory
        from ..pruner import ADMMPruner

        args = self.args
        pruner = ADMMPruner.from_pretrained(
            args.model,
            config=config,
            torch_dtype=_torch_dtype(args.torch_dtype),
            device_map=args.device_map,
            trust_remote_code=args.trust_remote_code,
            **({"offload_folder": args.offload_folder} if args.offload_folder is not None else {}),
        )
        from ..memory import model_bytes

        check_writable_directory(args.output, "--output", model_bytes(pruner.model))  # now with the real size
        from ..distributed import current

        report = pruner.prune(
            allow_unpruned=args.allow_unpruned,
            calibration_dataset=calibration,
            show_progress=not args.no_progress,
            activation_memory=activation_memory,
            checkpoint_dir=args.checkpoint_dir,
            activation_cache_dir=args.activation_cache_dir,
        )
        if not current().is_main:
            return  # every rank holds the same pruned model: rank 0 evaluates, saves and pushes it
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
        push_saved_output(self.args, path, "pruned")

    def _check_large_model_arguments(self) -> int | str | None:
        """Check --checkpoint-dir, --activation-memory, --activation-cache-dir, --streaming and the options it excludes,
        before anything is loaded; returns the --activation-memory value for ``activation_memory=``."""
        args = self.args
        activation_memory: int | str | None = None
        if args.deprecated_max_memory is not None:
            if args.activation_memory is not None:
                self.parser.error("argument --max-memory: not allowed with --activation-memory (its new name)")
            print(
                "warning: --max-memory is renamed --activation-memory (the budget for the calibration activations; "
                "accelerate's max_memory is a weight budget)",
                file=sys.stderr,
            )
            args.activation_memory = args.deprecated_max_memory
        if args.activation_memory is not None:
            from ..memory import parse_size

            text = args.activation_memory.strip()
            activation_memory = int(text) if text.isdigit() else text
            try:
                parse_size(
                    "activation_memory",
                    activation_memory,
                    args.activation_memory,
                    "bytes or a size such as '8GiB' or '8GB'",
                )
            except ValueError as err:
                self.parser.error(f"argument --activation-memory: {err}")
        if args.activation_cache_dir is not None:
            from ..activations import resolve_storage

            try:
                resolve_storage("cpu", args.activation_cache_dir)
            except ValueError as err:
                self.parser.error(f"argument --activation-cache-dir: {err}")
            if activation_memory is not None:
                self.parser.error(
                    "argument --activation-memory: not allowed with --activation-cache-dir (the budget is for activations "
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
            return activation_memory
        excluded = {
            "--device-map": args.device_map is not None,
            "--offload-folder": args.offload_folder is not None,
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
        return activation_memory

    def _run_streaming(self, config: Any, activation_memory: int | str | None, calibration: Any) -> None:
        """``--streaming``: :func:`optimum_admm.streaming.prune_checkpoint` from a local or downloaded checkpoint.

        The evaluation (``--eval-dataset``), the sidecar and the card are written into the staged output before it
        is renamed into place: nothing is patched afterwards.
        """
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
        base_model = args.base_model
        if base_model is None and not Path(args.model).exists():
            base_model = args.model
        result = prune_checkpoint(
            source,
            args.output,
            config,
            calibration,
            execution_device=args.execution_device or "cpu",
            activation_memory=activation_memory,
            overwrite=args.overwrite,
            show_progress=not args.no_progress,
            checkpoint_dir=args.checkpoint_dir,
            activation_cache_dir=args.activation_cache_dir,
            evaluate=self._streamed_evaluation(config) if args.eval_dataset is not None else None,
            allow_unpruned=args.allow_unpruned,
            base_model=base_model,
            repo_id=args.push_to_hub,
        )
        from ..distributed import current

        if not current().is_main:
            return  # rank 0 wrote the output
        report = result.report
        if report is not None and hasattr(report, "summary"):
            print(report.summary(max_rows=20))
        print(
            f"streamed: load {result.load_seconds:.1f} s, compute {result.compute_seconds:.1f} s, "
            f"write {result.write_seconds:.1f} s"
        )
        for dataset, measured in (result.evaluation or {}).items():
            print(f"perplexity on {dataset}: {measured.perplexity:.4f}")
        path = result.save_dir.resolve()
        print(f"saved to {path}")
        push_saved_output(self.args, path, "pruned")

    def _streamed_evaluation(self, config: Any):
        """The ``evaluate`` callback of a streamed prune: the staged output, loaded whole (the same numbers as
        without ``--streaming``)."""
        args = self.args

        def evaluate(staging: Path) -> dict[str, Any]:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from ..calibration import window_length
            from ..evaluation import perplexity

            model = AutoModelForCausalLM.from_pretrained(staging, dtype="auto").eval()
            measured = perplexity(
                model,
                AutoTokenizer.from_pretrained(staging),
                _texts(args.eval_dataset),
                sequence_length=window_length(model.config, config.sequence_length),
                max_tokens=args.eval_max_tokens,
            )
            return {_dataset_key(args.eval_dataset): measured}

        return evaluate


def _torch_dtype(text: str) -> Any:
    """``--dtype``: ``auto`` or a torch floating dtype name (``bfloat16``, ``torch.float16``)."""
    import torch

    if text == "auto":
        return text
    value = getattr(torch, text.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InvalidArgumentError(
            f"argument --dtype: {text!r} is invalid; allowed: auto, float32, bfloat16, float16 (a torch floating dtype)"
        )
    return value


def _calibration_texts(dataset: str, flag: str, load_named: bool = True, args: Any = None) -> list[str]:
    """A ``--dataset`` file decoded, or a dataset loaded (when ``load_named``), before the model is loaded."""
    from ..calibration import NAMED_DATASETS, load_dataset_texts, load_named_texts, read_text_file

    if dataset in NAMED_DATASETS:
        return (
            load_named_texts(dataset, "train", num_documents=20000 if dataset == "c4" else None) if load_named else []
        )
    if Path(dataset).is_file():
        return [read_text_file(dataset, flag)]
    if not load_named:
        return []
    return load_dataset_texts(dataset, args.dataset_config, args.dataset_split, args.text_column, parameter=flag)


def _checkpoint_bytes(source: Path | None) -> int | None:
    """The size of a local checkpoint's safetensors weights (the pruned output is as large), else ``None``."""
    if source is None:
        return None
    return sum(p.stat().st_size for p in source.glob("*.safetensors")) or None


def _dataset_description(args: Any) -> str:
    """What the report and the card record for ``--dataset``: a named dataset, a file's name, or a datasets id with
    its configuration, split and column."""
    from ..calibration import NAMED_DATASETS, describe_source

    if args.dataset in NAMED_DATASETS or Path(args.dataset).is_file():
        return describe_source(args.dataset)
    name = Path(args.dataset).name if Path(args.dataset).exists() else args.dataset
    config = f"/{args.dataset_config}" if args.dataset_config else ""
    return f"datasets:{name}{config}[{args.dataset_split}].{args.text_column}"
