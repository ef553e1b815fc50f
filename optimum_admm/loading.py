"""Loading a model so that every failure explains itself, before anything is downloaded or loaded.

:func:`check_model_source` looks at what ``from_pretrained`` would be given: a local-looking path that does not
exist is reported as such (the Hub is never asked), a directory without ``config.json``, a broken ``config.json``, an
unknown ``model_type``, custom code without ``trust_remote_code``, pickled weights only (refused on purpose: safetensors
only), a Hub id while offline mode is on and the model is not cached. :func:`explained_load_errors` turns what the Hub
client and transformers raise while loading (a missing, gated or private repo, a missing revision, no network) into a
:class:`~optimum_admm.errors.ModelLoadError` with what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import ModelLoadError

__all__ = ["check_model_source", "explained_load_errors", "looks_like_a_path", "offline_mode"]

_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def looks_like_a_path(text: str) -> bool:
    """Whether ``text`` can only mean a local path (a Hub id is ``name`` or ``namespace/name``).

    Example:
        >>> looks_like_a_path("./my-model"), looks_like_a_path("/data/llama"), looks_like_a_path("org/model")
        (True, True, False)
    """
    return (
        text.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or text in (".", "..")
        or text.count("/") >= 2
        or "\\" in text
        or (len(text) > 1 and text[1] == ":")  # C:\...
    )


def offline_mode() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_model_source(
    model: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    parameter: str = "model_or_path",
) -> Path | None:
    """Refuse, with what to do, a model source that cannot load; returns the local directory (``None`` for a Hub id).

    ``parameter`` names the argument in messages (``"--model"`` on the command line).

    Raises:
        ModelLoadError: for each case above, naming the path or id.

    Example:
        >>> check_model_source("./no-such-model")
        Traceback (most recent call last):
        ...
        optimum_admm.errors.ModelLoadError: model_or_path ./no-such-model does not exist ...
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{parameter} {text} is a file; allowed: a checkpoint directory (with config.json) or a Hub id"
            )
        check_checkpoint_directory(path, parameter, trust_remote_code)
        return path
    if looks_like_a_path(text):
        raise ModelLoadError(f"{parameter} {text} does not exist (a local path: the Hub was not asked)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise ModelLoadError(
            f"{parameter} {text!r} is neither an existing directory nor a Hub id ('namespace/name')"
        ) from None
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(text, "config.json", revision=revision), str)
    if offline_mode() and not cached:
        raise ModelLoadError(
            f"{parameter} {text} is not in the local Hub cache, and HF_HUB_OFFLINE=1 forbids downloading it; "
            "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to download it, or pass a local directory"
        )
    if not cached and not offline_mode():
        _check_on_the_hub(text, revision, parameter)
    return None


def _check_on_the_hub(repo_id: str, revision: str | None, parameter: str) -> None:
    """One quick request for a model that is neither local nor cached: a missing repo or an unreachable Hub is
    said at once (the download client would retry for about a minute and then blame the network)."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=10)
    except hub.GatedRepoError:
        return  # its metadata is public; the download says what to do if the token lacks access
    except hub.RepositoryNotFoundError:
        raise ModelLoadError(
            f"{parameter} {repo_id} is neither a local directory nor a model on the Hub (if it is private, log in "
            "with hf auth login or set HF_TOKEN)"
        ) from None
    except hub.RevisionNotFoundError:
        raise ModelLoadError(f"{parameter} {repo_id}: revision {revision!r} does not exist in that repo") from None
    except hub.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "?")
        raise ModelLoadError(
            f"{parameter} {repo_id}: the Hub answered HTTP {status}; try again later, or pass a local directory"
        ) from None
    except Exception as err:  # the HTTP client's connection errors have no common base with OSError
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise ModelLoadError(
            f"{parameter} {repo_id} is not a local directory, and the Hub cannot be reached ({reason}): if it is a "
            "local path, it does not exist; if it is a Hub model, check the network, or set HF_HUB_OFFLINE=1 to "
            "load it from the cache"
        ) from None


def check_checkpoint_directory(path: Path, parameter: str = "model_or_path", trust_remote_code: bool = False) -> None:
    """A local checkpoint directory has a readable ``config.json`` of a known (or trusted custom) model type and
    safetensors weights."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{parameter} {path} has no config.json: not a transformers checkpoint (save one with "
            "model.save_pretrained(dir))"
        )
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{config_path} is not valid JSON ({err}): the checkpoint is damaged") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ModelLoadError(f"{config_path} has no model_type: not a transformers model config")
    from transformers import CONFIG_MAPPING, __version__

    custom = "auto_map" in data
    if custom and not trust_remote_code:
        raise ModelLoadError(
            f"{parameter} {path} needs custom modeling code (auto_map in config.json); pass trust_remote_code=True "
            "(--trust-remote-code on the command line) only if you trust that code"
        )
    if not custom and data["model_type"] not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{config_path}: model_type {data['model_type']!r} is not known to transformers {__version__}; "
            "upgrade transformers"
        )
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in _PICKLED for p in path.glob(pattern))
        if pickled:
            raise ModelLoadError(
                f"{parameter} {path} holds only pickled weights ({pickled[0]}); optimum-admm loads safetensors only, "
                "since unpickling can run arbitrary code. Convert it once where you trust it: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)"
            )
        raise ModelLoadError(f"{parameter} {path} has no weights (no *.safetensors file)")


@contextlib.contextmanager
def explained_load_errors(model: str | os.PathLike, parameter: str = "model_or_path") -> Iterator[None]:
    """Re-raise the Hub client's and transformers' loading errors as :class:`ModelLoadError` with what to do."""
    from huggingface_hub import errors as hub

    name = os.fspath(model)
    try:
        yield
    except hub.GatedRepoError:
        raise ModelLoadError(
            f"{parameter} {name} is gated: accept its conditions on its Hub page, then log in (hf auth login) or "
            "set HF_TOKEN"
        ) from None
    except hub.RepositoryNotFoundError:
        raise ModelLoadError(
            f"{parameter} {name} was not found on the Hub (or it is private: log in with hf auth login or set "
            "HF_TOKEN)"
        ) from None
    except hub.RevisionNotFoundError:
        raise ModelLoadError(f"{parameter} {name}: the revision does not exist in that repo") from None
    except (hub.OfflineModeIsEnabled, hub.LocalEntryNotFoundError):
        raise ModelLoadError(
            f"{parameter} {name} is not in the local Hub cache and cannot be downloaded (HF_HUB_OFFLINE=1, or no "
            "network); pass a local directory or run once with network access"
        ) from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(
                f"{parameter} {name} needs custom modeling code; pass trust_remote_code=True (--trust-remote-code) "
                "only if you trust that code"
            ) from None
        raise
