"""Push a saved pruned model (weights, ``pruning_config.json``, model card) to the Hub in one commit.

Everything goes through ``huggingface_hub``: ``create_repo(exist_ok=True)``, then ``upload_folder`` (one commit with
every file; weight files the new save no longer has are deleted in the same commit). The endpoint is the one
``huggingface_hub`` is configured with (``HF_ENDPOINT``). The token is passed to the client and nowhere else: it is
never logged, printed or written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import HubError, InvalidArgumentError

__all__ = ["HubPermissionError", "check_push_arguments", "push_folder_to_hub", "require_token"]


class HubPermissionError(HubError, PermissionError):
    """The Hub refused the token (HTTP 401/403)."""


def require_token(token: str | bool | None = None, parameter: str = "token") -> None:
    """Refuse, before any work, a push without a token: none given and none in ``HF_TOKEN`` or the stored login.

    Example:
        >>> require_token("hf_example")
    """
    if isinstance(token, str) and token:
        return
    from huggingface_hub import get_token

    if token is False or get_token() is None:
        raise HubError(
            f"pushing to the Hub needs a token ({parameter}=None found none): set HF_TOKEN or run `hf auth login` "
            "(a token is never a command-line argument)"
        )


logger = logging.getLogger(__name__)

#: Weight files of an earlier push that a new push replaces (a model re-saved with other shards leaves none behind).
_STALE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]


def _check_repo_id(repo_id: Any) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    allowed = "a Hub repo id 'name' or 'namespace/name' (letters, digits, '-', '_', '.')"
    if not isinstance(repo_id, str):
        raise InvalidArgumentError(f"repo_id={repo_id!r} is invalid; allowed: {allowed}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise InvalidArgumentError(f"repo_id={repo_id!r} is invalid; allowed: {allowed}") from None
    return repo_id


def check_push_arguments(
    repo_id: Any, private: Any = None, token: Any = None, revision: Any = None, commit_message: Any = None
) -> None:
    """Validate the arguments of a push before any work (a bad ``repo_id`` fails before saving anything).

    Example:
        >>> check_push_arguments("org/model-sparse", private=True)
    """
    _check_repo_id(repo_id)
    if private is not None and not isinstance(private, bool):
        raise InvalidArgumentError(f"private={private!r} is invalid; allowed: True, False or None")
    if token is not None and not isinstance(token, (str, bool)):
        raise InvalidArgumentError(
            f"token of type {type(token).__name__} is invalid; allowed: a string, a bool or None"
        )
    for name, value in (("revision", revision), ("commit_message", commit_message)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidArgumentError(f"{name}={value!r} is invalid; allowed: a non-empty string or None")


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload a saved pruned model directory to ``repo_id`` in one commit (as a pull request with ``create_pr``).

    Args:
        folder: a directory written by ``ADMMPruner.save_pretrained``.
        repo_id: ``"namespace/name"``; created if missing (``private`` applies only then).
        private: visibility of a newly created repo (``None``: the Hub's default).
        token: a Hub token (default: the one ``huggingface_hub`` finds: ``HF_TOKEN`` or the stored login).
        revision: the branch to commit to (created from the default branch if missing); default ``main``.
        commit_message: default ``"Upload pruned model (<method>, <sparsity>)"``.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit.

    Raises:
        HubPermissionError: the Hub refused the token (HTTP 401/403); the message never contains the token.
        HubError: any other Hub or network error; nothing is committed when the commit fails.

    Example:
        >>> push_folder_to_hub("smollm2-admm-60", "me/smollm2-admm-60", private=True)  # doctest: +SKIP
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_push_arguments(repo_id, private, token, revision, commit_message)
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise InvalidArgumentError(f"folder={str(folder)!r} is not a saved model directory (no config.json)")
    if commit_message is None:
        commit_message = _default_message(folder)
    api = HfApi(token=token)  # built now, so that it uses the endpoint configured at call time
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            delete_patterns=_STALE_PATTERNS,
            create_pr=create_pr,
        )
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubPermissionError(
                f"the Hub refused to push to {repo_id!r} (HTTP {status}): check that the token is valid and has "
                "write access to this namespace"
            ) from None
        raise HubError(
            f"the push to {repo_id!r} failed: the Hub answered HTTP {status or '?'}; nothing was committed, push "
            "again later"
        ) from None
    except OSError as err:  # no network, a refused connection
        raise HubError(
            f"the push to {repo_id!r} failed ({type(err).__name__}: {err}); nothing was committed, push again later"
        ) from None
    logger.info("pushed %s to %s (commit %s)", folder, repo_id, getattr(info, "oid", "?"))
    return info


def _default_message(folder: Path) -> str:
    import json

    kind = "pruned"
    try:
        data = json.loads((folder / "pruning_config.json").read_text(encoding="utf-8"))
        if data.get("method") == "sheared_llama":
            kind = "sheared"
            params = data["parameters"]
            return f"Upload sheared model ({params['source']:,} -> {params['sheared']:,} parameters)"
        config = data["config"]
        return f"Upload pruned model ({data['method']}, {config['mask_structure']}, sparsity {config['sparsity']:g})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"Upload {kind} model"
