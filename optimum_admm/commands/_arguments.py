"""argparse types and helpers shared by the ``optimum-cli admm`` subcommands (no heavy imports)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def _calibration_dataset(text: str) -> str:
    """``--dataset`` of prune: a named dataset, a text file, a directory of data files or a Hub dataset id."""
    if text in _NAMED_DATASETS or Path(text).exists():
        return text
    if Path(text).suffix.lower() in (".txt", ".md", ".json", ".jsonl", ".csv", ".parquet"):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist (a file name, not a Hub dataset id)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a named dataset ({', '.join(_NAMED_DATASETS)}), an existing file or directory, nor "
            "a Hub dataset id"
        ) from None
    return text


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


def _device_map(text: str) -> Any:
    """``--device-map``: ``auto``, ``balanced``, ``balanced_low_0``, ``sequential``, a device (``cpu``, ``cuda:0``) or
    accelerate's mapping as JSON (``'{"model.embed_tokens": "cpu", "model.layers.0": "disk", ...}'``)."""
    import json

    if not text.lstrip().startswith("{"):
        return text
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({err})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: a JSON object {{module name: device}}")
    return mapping


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device-map`` and ``--offload-folder``, shared by the subcommands that load a model."""
    parser.add_argument(
        "--device-map",
        type=_device_map,
        default=None,
        help="accelerate device map: 'auto', 'balanced', 'cpu', 'cuda:0' or a JSON object {module: device}.",
    )
    parser.add_argument("--offload-folder", default=None, help="Where a device map's 'disk' modules are offloaded.")


def push_saved_output(args: Any, path: Path, what: str) -> None:
    """``--push-to-hub``: push a saved output in one commit and print where; a failed push says where the output is
    saved, so it can be retried (``what``: "pruned", "sheared")."""
    if args.push_to_hub is None:
        return
    from ..errors import HubError
    from ..hub import push_folder_to_hub

    try:
        info = push_folder_to_hub(
            path, args.push_to_hub, private=True if args.private else None, revision=args.revision
        )
    except OSError as err:  # the model is saved: say where, so the push can be retried
        raise HubError(f"{err} (the {what} model is saved in {path})") from None
    print(f"pushed to {args.push_to_hub}: {getattr(info, 'commit_url', info)}")
