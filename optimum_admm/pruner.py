"""``ADMMPruner``: the façade, in the shape of Optimum's compression API. No maths here."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn

from .calibration import (
    CalibrationSource,
    calibration_batches,
    describe_source,
    get_calibration_data,
    vocabulary_size,
    window_length,
)
from .configuration import ADMMConfig, PruningConfig, default_of
from .errors import InvalidArgumentError
from .modeling import find_decoder_blocks, find_prunable_layers, get_weight_matrix
from .registry import get_method
from .reporting import PruningReport
from .sequential import prune_model

__all__ = ["ADMMPruner"]

logger = logging.getLogger(__name__)


def _check_config(config: PruningConfig | None) -> PruningConfig:
    if config is None:
        return ADMMConfig()
    if not isinstance(config, PruningConfig):
        raise InvalidArgumentError(
            f"config of type {type(config).__name__} is invalid; allowed: a PruningConfig such as ADMMConfig(...)"
        )
    get_method(config)  # fails now, not after loading, when the config type has no registered method
    return config


class ADMMPruner(OptimumQuantizer):
    """Prune a Hugging Face causal LM block by block with ADMM (or any registered method).

    Args:
        model: the model to prune in place (a ``PreTrainedModel``, possibly spread by an accelerate device map).
        tokenizer: its tokenizer (needed for text calibration data and for saving).
        config: the pruning recipe; defaults to ``ADMMConfig()`` (50% unstructured).

    Example:
        >>> from optimum_admm import ADMMConfig, ADMMPruner
        >>> pruner = ADMMPruner.from_pretrained("HuggingFaceTB/SmolLM2-135M", config=ADMMConfig(sparsity=0.6))  # doctest: +SKIP
        >>> report = pruner.prune(calibration_dataset="wikitext2", save_dir="smollm2-admm-60")  # doctest: +SKIP
        >>> print(report.summary(max_rows=5))  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, config: PruningConfig | None = None) -> None:
        self.config = _check_config(config)
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model of type {type(model).__name__} is invalid; allowed: a torch nn.Module")
        self.model = model
        self.tokenizer = tokenizer
        blocks_name, blocks = find_decoder_blocks(model)
        self._layers = find_prunable_layers(
            model,
            self.config.targets,
            self.config.ignore,
            blocks,
            blocks_name,
            default_of(type(self.config), "targets"),
        )
        if self.config.nm is not None:
            m = self.config.nm[1]
            for layers in self._layers:
                for name, module in layers.items():
                    in_features = get_weight_matrix(module).shape[1]
                    if in_features % m:
                        raise InvalidArgumentError(
                            f"mask_structure={self.config.mask_structure!r} needs in_features divisible by M={m}; "
                            f"{name} has in_features={in_features}. Add it to `ignore` or use another pattern"
                        )
        self.report: PruningReport | None = None
        logger.info(
            "%s: %d blocks at %s, %d layers to prune",
            type(model).__name__,
            len(blocks),
            blocks_name,
            sum(len(layers) for layers in self._layers),
        )

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | os.PathLike | nn.Module,
        config: PruningConfig | None = None,
        tokenizer: Any = None,
        *,
        torch_dtype: torch.dtype | str | None = "auto",
        dtype: torch.dtype | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        **model_kwargs: Any,
    ) -> ADMMPruner:
        """Load a model (local path or Hub id) or wrap one already loaded.

        Args:
            model_or_path: a Hub id, a local checkpoint directory, or a loaded ``PreTrainedModel``.
            config: the pruning recipe (validated before anything is loaded).
            tokenizer: the tokenizer of an already loaded model; loaded from ``model_or_path`` otherwise.
            torch_dtype: dtype to load the weights in (``"auto"``: as stored).
            dtype: the same, under transformers 5's name (wins over ``torch_dtype`` when given).
            device_map: passed to transformers/accelerate (``"auto"``, ``"cpu"``, a dict, ...).
            revision: Hub revision (branch, tag or commit).
            trust_remote_code: allow custom modeling code from the Hub. Off by default; turn on only for repos you
                trust.
            **model_kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.

        Example:
            >>> pruner = ADMMPruner.from_pretrained(model, tokenizer=tokenizer,  # doctest: +SKIP
            ...     config=ADMMConfig(sparsity=0.5, mask_structure="2:4"))
        """
        config = _check_config(config)
        if isinstance(model_or_path, nn.Module):
            if model_kwargs or device_map is not None or revision is not None:
                raise InvalidArgumentError(
                    "device_map, revision and loading keyword arguments apply only when model_or_path is a path or "
                    "Hub id; got an already loaded model"
                )
            return cls(model_or_path, tokenizer=tokenizer, config=config)
        if not isinstance(model_or_path, (str, os.PathLike)):
            raise InvalidArgumentError(
                f"model_or_path of type {type(model_or_path).__name__} is invalid; allowed: a Hub id, a local "
                "path or a loaded PreTrainedModel"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .loading import check_model_source, explained_load_errors

        check_model_source(model_or_path, trust_remote_code=trust_remote_code, revision=revision)
        load_kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        with explained_load_errors(model_or_path):
            model = AutoModelForCausalLM.from_pretrained(
                model_or_path,
                dtype=torch_dtype if dtype is None else dtype,
                device_map=device_map,
                use_safetensors=True,
                **load_kwargs,
                **model_kwargs,
            )
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model_or_path, **load_kwargs)
        return cls(model, tokenizer=tokenizer, config=config)

    def prune(
        self,
        calibration_dataset: CalibrationSource | None = None,
        save_dir: str | os.PathLike | None = None,
        *,
        text_column: str = "text",
        overwrite: bool = False,
        show_progress: bool = True,
        activation_memory: int | str | dict[int | str, int | str] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        activation_cache_dir: str | os.PathLike | None = None,
        allow_unpruned: bool = False,
        max_memory: Any = None,
    ) -> PruningReport:
        """Prune the model in place and return the per-layer report.

        Args:
            calibration_dataset: ``"wikitext2"``, ``"c4"``, a ``datasets.Dataset``, a list of strings, a text file
                path, a DataLoader of token ids or a ``(num_samples, length)`` tensor. Not needed by methods that
                use no calibration data.
            save_dir: when given, the pruned model, tokenizer and ``pruning_config.json`` are saved there.
            text_column: the text column of a ``datasets.Dataset``.
            overwrite: allow ``save_dir`` to be an existing non-empty directory.
            show_progress: show a progress bar over the decoder blocks.
            activation_memory: budget for the calibration activations kept on CPU between blocks (bytes, ``"8GiB"`` or
                accelerate's ``{"cpu": "8GiB"}``); the expected size is logged, and a budget that cannot hold it is
                refused with the numbers before any forward.
            checkpoint_dir: record every finished block there; re-running the same command after an interruption
                continues from the next block (a different recipe, model or calibration set is refused).
            allow_unpruned: prune even when more than 5% of the decoder blocks' weights are not targeted linears
                (fused expert tensors, for instance): by default that is refused, naming them, before any work.
            activation_cache_dir: keep the calibration activations in memory-mapped files in this directory
                instead of RAM, for calibration sets that do not fit (the files are unlinked as soon as they are
                mapped: nothing is left behind).
            max_memory: the former name of ``activation_memory`` (deprecated: in accelerate and transformers,
                ``max_memory`` is the *weight* budget per device, which belongs to ``from_pretrained(...,
                device_map="auto", max_memory=...)``); still accepted with a ``FutureWarning``.

        Example:
            >>> report = pruner.prune(calibration_dataset=["some text", "more text"])  # doctest: +SKIP
            >>> report = pruner.prune("wikitext2", checkpoint_dir="ckpt", activation_memory="8GiB")  # doctest: +SKIP
        """
        if max_memory is not None:
            if activation_memory is not None:
                raise InvalidArgumentError(
                    "max_memory= and activation_memory= are both given; allowed: activation_memory= only (the "
                    "activation budget; accelerate's weight budget max_memory= goes to from_pretrained)"
                )
            warnings.warn(
                "prune(max_memory=...) is renamed activation_memory=: it is the budget for the calibration "
                "activations, not accelerate's weight budget (pass that to from_pretrained(..., max_memory=...))",
                FutureWarning,
                stacklevel=2,
            )
            activation_memory = max_memory
        config = self.config
        if save_dir is not None:  # writable, with room for the output, before any forward
            from .export import check_save_dir
            from .files import check_writable_directory

            check_save_dir(save_dir, overwrite)
            from .memory import model_bytes

            check_writable_directory(save_dir, "save_dir", model_bytes(self.model))
        batches = None
        calibration: dict[str, Any] = {}
        if config.needs_calibration:
            if calibration_dataset is None:
                raise InvalidArgumentError(
                    f"calibration_dataset=None is invalid for method {config.method!r}; allowed: 'wikitext2', "
                    "'c4', a datasets.Dataset, a list of strings, a text file path, a DataLoader or a tensor"
                )
            sequence_length = window_length(getattr(self.model, "config", None), config.sequence_length)
            ids = get_calibration_data(
                calibration_dataset,
                self.tokenizer,
                num_samples=config.num_samples,
                sequence_length=sequence_length,
                seed=config.seed,
                text_column=text_column,
                vocab_size=vocabulary_size(self.model),
            )
            batches = calibration_batches(ids, config.calibration_batch_size)
            calibration = {
                "dataset": describe_source(calibration_dataset),
                "num_samples": int(ids.shape[0]),
                "sequence_length": int(ids.shape[1]),
                "seed": config.seed,
            }
        report = prune_model(
            self.model,
            config,
            batches,
            show_progress=show_progress,
            activation_memory=activation_memory,
            checkpoint_dir=checkpoint_dir,
            activation_cache_dir=activation_cache_dir,
            allow_unpruned=allow_unpruned,
        )
        report.calibration = calibration
        self.report = report
        model_config = getattr(self.model, "config", None)
        if model_config is not None:  # config.json says the model is pruned, through every later save_pretrained
            from .inspection import config_section

            model_config.pruning = config_section(config.method, report.sparsity, config.mask_structure)
        logger.info("pruned: sparsity %.4f over %d layers", report.sparsity, len(report.layers))
        if save_dir is not None:
            from .distributed import current

            group = current()
            if group.is_main:  # with several ranks every one holds the same pruned model: rank 0 saves it
                self.save_pretrained(save_dir, overwrite=overwrite)
            group.barrier()
        return report

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, **kwargs: Any) -> PruningReport:
        """Optimum's compression verb: prune, then save to ``save_dir`` (``file_prefix`` is not used)."""
        if file_prefix is not None:
            warnings.warn("file_prefix is ignored: the output uses transformers' file names", stacklevel=2)
        return self.prune(save_dir=save_dir, **kwargs)

    def save_pretrained(
        self,
        save_dir: str | os.PathLike,
        overwrite: bool = False,
        *,
        max_shard_size: int | str = "5GB",
        save_masks: bool = False,
        evaluation_results: dict[str, Any] | None = None,
        base_model: str | None = None,
        license: str | None = None,
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_kwargs: Any,
    ) -> Path:
        """Save the pruned model atomically: safetensors, tokenizer, ``pruning_config.json`` and a model card.

        As in transformers, ``push_to_hub=True`` also pushes the saved directory to ``repo_id`` (default: the
        directory's name) in one commit; ``push_kwargs`` are those of :meth:`push_to_hub` (``private``, ``token``,
        ``revision``, ``commit_message``, ``create_pr``). ``safe_serialization=False`` is refused: optimum-admm
        writes safetensors only.

        The output loads with plain ``AutoModelForCausalLM.from_pretrained(save_dir)``. Storage stays dense (pruned
        weights are exact zeros; no ``quantization_config`` or ``sparsity_config`` is written).

        Args:
            save_dir: the target directory (written beside it, then renamed into place).
            overwrite: replace an existing non-empty ``save_dir``.
            max_shard_size: safetensors shard size, e.g. ``"5GB"``; larger models are sharded with an index.
            save_masks: also write bit-packed ``masks.safetensors`` (read with :func:`optimum_admm.export.load_masks`).
            evaluation_results: ``{dataset: perplexity}`` of the pruned model for the sidecar and the card's
                ``model-index``; defaults to ``self.evaluation_results`` when the caller set it.
            base_model: Hub id of the dense model for the card (default: the model's ``_name_or_path``).
            license: the card's license (default: the base model's when known locally).

        Example:
            >>> pruner.evaluation_results = {"wikitext2": 14.2}  # doctest: +SKIP
            >>> pruner.save_pretrained("smollm2-admm-60", save_masks=True)  # doctest: +SKIP
        """
        from .export import save_pruned

        if safe_serialization is not True:
            raise InvalidArgumentError(
                f"safe_serialization={safe_serialization!r} is invalid; allowed: True (safetensors only: pickled "
                "weights can run code when loaded)"
            )
        if push_to_hub:
            from .hub import check_push_arguments, require_token

            repo_id = repo_id or Path(save_dir).name
            check_push_arguments(repo_id, push_kwargs.get("private"), push_kwargs.get("token"),
                                 push_kwargs.get("revision"), push_kwargs.get("commit_message"))  # fmt: skip
            require_token(push_kwargs.get("token"))
        elif push_kwargs:
            raise InvalidArgumentError(f"{sorted(push_kwargs)} apply only with push_to_hub=True")
        if evaluation_results is None:
            evaluation_results = getattr(self, "evaluation_results", None)
        folder = save_pruned(
            self.model,
            self.tokenizer,
            self.config,
            self.report,
            save_dir,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            save_masks=save_masks,
            evaluation_results=evaluation_results,
            base_model=base_model,
            license=license,
            repo_id=repo_id if push_to_hub else None,
        )
        if push_to_hub:
            from .hub import push_folder_to_hub

            push_folder_to_hub(folder, repo_id, **push_kwargs)
        return folder

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        **save_kwargs: Any,
    ) -> Any:
        """Push the weights, ``pruning_config.json`` and the model card to the Hub in one commit.

        The model is saved to a temporary directory (see :meth:`save_pretrained`; ``save_kwargs`` go there) and
        uploaded with ``huggingface_hub`` (``create_repo(exist_ok=True)``, then ``upload_folder``).

        Args:
            repo_id: ``"namespace/name"``; created if missing.
            private: visibility of a newly created repo.
            token: a Hub token (default: ``HF_TOKEN`` or the stored login). Never logged or written.
            revision: branch to commit to (created if missing); default ``main``.
            commit_message: the commit message.
            create_pr: open a pull request with the commit instead of committing to the branch.

        Returns:
            The ``huggingface_hub.CommitInfo`` of the commit.

        Example:
            >>> pruner.push_to_hub("me/smollm2-admm-60", private=True)  # doctest: +SKIP
        """
        import tempfile

        from .export import save_pruned
        from .hub import check_push_arguments, push_folder_to_hub, require_token

        check_push_arguments(repo_id, private, token, revision, commit_message)
        require_token(token)  # before the model is saved
        save_kwargs.setdefault("evaluation_results", getattr(self, "evaluation_results", None))
        with tempfile.TemporaryDirectory(prefix="optimum-admm-push-") as tmp:
            folder = save_pruned(
                self.model,
                self.tokenizer,
                self.config,
                self.report,
                Path(tmp) / "model",
                repo_id=repo_id,
                **save_kwargs,
            )
            return push_folder_to_hub(
                folder,
                repo_id,
                private=private,
                token=token,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )
