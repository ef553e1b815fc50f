"""``optimum-cli admm prune``: prune a causal LM (in memory, through a device map, or streamed) and save it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from ._arguments import (
    _dataset,
    _dataset_key,
    _existing_file,
    _fail,
    _pattern,
    _positive_int,
    _RegisteredMethods,
    _sparsity,
    _texts,
)

__all__ = ["PruneCommand"]


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
                evaluate=self._streamed_evaluation(config) if args.eval_dataset is not None else None,
                base_model=base_model,
                repo_id=args.push_to_hub,
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
        for dataset, measured in (result.evaluation or {}).items():
            print(f"perplexity on {dataset}: {measured.perplexity:.4f}")
        path = result.save_dir.resolve()
        print(f"saved to {path}")
        self._push(path)

    def _streamed_evaluation(self, config: Any):
        """The ``evaluate`` callback of a streamed prune: the staged output, loaded whole (the same numbers as
        without ``--streaming``)."""
        args = self.args

        def evaluate(staging: Path) -> dict[str, Any]:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from ..evaluation import perplexity
            from ..streaming import calibration_length

            model = AutoModelForCausalLM.from_pretrained(staging, dtype="auto").eval()
            measured = perplexity(
                model,
                AutoTokenizer.from_pretrained(staging),
                _texts(args.eval_dataset),
                sequence_length=calibration_length(model, config.sequence_length),
                max_tokens=args.eval_max_tokens,
            )
            return {_dataset_key(args.eval_dataset): measured}

        return evaluate

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
