"""Files of a saved pruned model, from a local directory or a Hub repo (downloaded and cached by huggingface_hub)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidArgumentError

__all__ = ["saved_file"]


def saved_file(
    save_dir: str | os.PathLike, filename: str, *, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """``filename`` of a saved pruned model: in a local directory, or downloaded (and cached) from a Hub repo id.

    Raises:
        InvalidArgumentError: the directory or repo has no such file (naming both).

    Example:
        >>> saved_file("smollm2-admm-60", "pruning_config.json")  # doctest: +SKIP
        PosixPath('smollm2-admm-60/pruning_config.json')
    """
    local = Path(save_dir)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise InvalidArgumentError(f"save_dir={str(save_dir)!r} has no {filename}")
        return path
    from huggingface_hub import errors as hub
    from huggingface_hub import hf_hub_download

    from .loading import looks_like_a_path

    if looks_like_a_path(str(save_dir)):
        raise InvalidArgumentError(f"save_dir={str(save_dir)!r} does not exist (a local path: the Hub was not asked)")
    try:
        return Path(hf_hub_download(str(save_dir), filename, revision=revision, token=token))
    except hub.EntryNotFoundError:
        raise InvalidArgumentError(f"repo {str(save_dir)!r} has no {filename}") from None
    except (hub.RepositoryNotFoundError, hub.RevisionNotFoundError, hub.LocalEntryNotFoundError) as err:
        raise InvalidArgumentError(
            f"save_dir={str(save_dir)!r} is neither a local directory nor a readable Hub repo ({type(err).__name__})"
        ) from None
