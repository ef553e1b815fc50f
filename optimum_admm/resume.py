"""Checkpoints between blocks, so an interrupted prune continues from the next block.

After block ``k`` the driver records, in ``checkpoint_dir``:

- ``block-{k:05d}.safetensors``: the pruned weights of block ``k``'s targeted layers;
- ``inputs-{k+1:05d}.safetensors``: the hidden states block ``k + 1`` receives (one tensor per calibration batch);
- ``state.json``: the fingerprint of the run (recipe, model, calibration data, Hub revision when known), the next
  block, the report rows and the digest of every block's dense weights, taken as each block is loaded.

Every file is written with :func:`optimum_admm.files.atomic_write`, and ``state.json`` last, so a process killed at
any point leaves either the previous or the new state, never a mix. A checkpoint written for another recipe, model
or calibration set is refused with the fields that differ; a resume re-digests the dense weights of every block it
restores and of the next one, and refuses a model whose weights differ, naming the block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointMismatchError
from .files import atomic_write
from .reporting import LayerReport
from .version import __version__

__all__ = [
    "CheckpointState",
    "block_path",
    "check_digest",
    "digest_tensors",
    "fingerprint",
    "load_state",
    "record_digest",
    "save_block",
    "load_block",
    "load_inputs",
]

logger = logging.getLogger(__name__)

STATE_NAME = "state.json"


@dataclass
class CheckpointState:
    """What a checkpoint directory says about an interrupted run.

    Example:
        >>> CheckpointState(fingerprint={"config": {}}, next_block=2).next_block
        2
    """

    fingerprint: dict[str, Any]
    next_block: int
    layers: list[LayerReport] = field(default_factory=list)
    #: ``{block index: digest of its dense weights}`` for every block started so far.
    digests: dict[int, str] = field(default_factory=dict)


def _hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
    if tensor.numel():
        digest.update(tensor.view(torch.uint8).numpy())  # the buffer itself: no copy of a large embedding


def digest_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors: names, shapes, dtypes and values.

    Example:
        >>> digest_tensors({"w": torch.zeros(2)}) == digest_tensors({"w": torch.zeros(2)})
        True
        >>> digest_tensors({"w": torch.zeros(2)}) == digest_tensors({"w": torch.ones(2)})
        False
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        _hash_tensor(digest, tensors[name])
    return digest.hexdigest()[:16]


def _input_embedding_weight(model: nn.Module) -> torch.Tensor | None:
    """The input embedding matrix, read through the model's store (``None`` where it is not in memory)."""
    from .stores import store_for

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is embeddings), None) if embeddings is not None else None
    if name is None or not any(True for _ in embeddings.parameters(recurse=False)):
        return None
    value = store_for(model).read(f"{name}.weight" if name else "weight")
    return None if value.is_meta else value


def fingerprint(model: nn.Module, config_dict: dict[str, Any], batches: list[torch.Tensor] | None) -> dict[str, Any]:
    """Identify a run: the recipe, the model (architecture, tensor names/shapes, embedding values, Hub revision when
    ``from_pretrained`` recorded one) and the data.

    Only the input embedding's values are hashed here (they are in memory even when blocks are offloaded or streamed
    and are never pruned); each block's weights are digested as the block is loaded (:func:`digest_tensors`).

    Example:
        >>> from torch import nn
        >>> sorted(fingerprint(nn.Linear(2, 2), {"sparsity": 0.5}, None))
        ['calibration', 'config', 'model']
    """
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    embedding = _input_embedding_weight(model)
    if embedding is not None:
        _hash_tensor(digest, embedding)
    data = hashlib.sha256()
    for batch in batches or []:
        for sample in batch.split(1):  # the samples, however they are batched
            _hash_tensor(data, sample)
    # how many samples run at once changes the result only by float rounding: a run may resume with another
    # batch size (several processes run one sample at a time)
    config = {k: v for k, v in config_dict.items() if k not in ("optimum_admm_version", "calibration_batch_size")}
    result = {"config": config, "model": digest.hexdigest()[:16], "calibration": data.hexdigest()[:16]}
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)
    if isinstance(revision, str) and revision:
        result["revision"] = revision
    return result


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key == "config":
            old, new = saved.get(key, {}), current.get(key, {})
            diffs += [
                f"config.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
        elif saved.get(key) != current.get(key):
            diffs.append(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}")
    return diffs


def load_state(checkpoint_dir: str | os.PathLike, current: dict[str, Any]) -> CheckpointState | None:
    """The state of an interrupted run in ``checkpoint_dir``, or ``None`` when it holds none.

    Raises:
        ValueError: when the checkpoint was written for another recipe, model or calibration set (listing each
            difference), or by a newer layout.
    """
    path = Path(checkpoint_dir) / STATE_NAME
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(current))  # tuples -> lists, as stored
    diffs = _differences(saved["fingerprint"], current)
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint_dir={str(checkpoint_dir)!r} holds a run with a different recipe, model or calibration set; "
            f"refusing to resume. Differences (saved -> now): {'; '.join(diffs)}. Use another checkpoint_dir or "
            "delete this one to start over"
        )
    layers = [LayerReport(**{**row, "shape": tuple(row["shape"])}) for row in saved["layers"]]
    digests = {int(k): v for k, v in saved.get("digests", {}).items()}
    logger.info("resuming from %s at block %d", checkpoint_dir, saved["next_block"])
    return CheckpointState(saved["fingerprint"], saved["next_block"], layers, digests)


def check_digest(
    checkpoint_dir: str | os.PathLike, state: CheckpointState, index: int, name: str, digest: str
) -> None:
    """Refuse to resume when block ``index`` (module ``name``) has other dense weights than the recorded run.

    Raises:
        ValueError: naming the block, when a digest was recorded for it and differs.
    """
    recorded = state.digests.get(index)
    if recorded is not None and recorded != digest:
        raise CheckpointMismatchError(
            f"checkpoint_dir={str(checkpoint_dir)!r} holds a run of another model: decoder block {index} ({name}) "
            f"has other weights (recorded digest {recorded}, now {digest}); refusing to resume. Use another "
            "checkpoint_dir or delete this one to start over"
        )


def _write_state(directory: Path, state: CheckpointState) -> None:
    payload = {
        "format": 2,
        "optimum_admm_version": __version__,
        "fingerprint": state.fingerprint,
        "next_block": state.next_block,
        "layers": [dataclasses.asdict(row) for row in state.layers],
        "digests": {str(k): v for k, v in sorted(state.digests.items())},
    }
    atomic_write(directory / STATE_NAME, lambda p: p.write_text(json.dumps(payload, indent=1)))


def record_digest(checkpoint_dir: str | os.PathLike, state: CheckpointState, index: int, digest: str) -> None:
    """Record the digest of block ``index``'s dense weights as it starts (so a resume can check the next block)."""
    if state.digests.get(index) == digest:
        return
    state.digests[index] = digest
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    _write_state(directory, state)


def save_block(
    checkpoint_dir: str | os.PathLike,
    index: int,
    tensors: dict[str, torch.Tensor],
    next_inputs: list[torch.Tensor] | None,
    state: CheckpointState,
) -> None:
    """Record block ``index`` as done: its pruned tensors, the next block's inputs, then ``state.json``."""
    from safetensors.torch import save_file

    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(block_path(directory, index), lambda p: save_file(cpu, str(p), metadata={"format": "pt"}))
    if next_inputs is not None:
        samples = [sample for t in next_inputs for sample in t.detach().to("cpu").split(1)]  # any batching resumes
        hidden = {f"hidden.{j}": t.contiguous() for j, t in enumerate(samples)}
        atomic_write(directory / f"inputs-{index + 1:05d}.safetensors", lambda p: save_file(hidden, str(p)))
    state.next_block = index + 1
    _write_state(directory, state)
    for stale in directory.glob("inputs-*.safetensors"):  # only the next block's inputs are ever needed
        if stale.name != f"inputs-{index + 1:05d}.safetensors":
            stale.unlink(missing_ok=True)


def block_path(checkpoint_dir: str | os.PathLike, index: int) -> Path:
    """Where block ``index``'s pruned tensors are recorded (a safetensors file with ``format: pt`` metadata).

    Example:
        >>> block_path("ckpt", 3).name
        'block-00003.safetensors'
    """
    return Path(checkpoint_dir) / f"block-{index:05d}.safetensors"


def load_block(checkpoint_dir: str | os.PathLike, index: int) -> dict[str, torch.Tensor]:
    """The pruned tensors recorded for block ``index``."""
    from safetensors.torch import load_file

    return load_file(str(block_path(checkpoint_dir, index)))


def load_inputs(checkpoint_dir: str | os.PathLike, index: int) -> list[torch.Tensor]:
    """The hidden states recorded as block ``index``'s inputs, one ``(1, seq, hidden)`` tensor per sample, in order."""
    from safetensors.torch import load_file

    loaded = load_file(str(Path(checkpoint_dir) / f"inputs-{index:05d}.safetensors"))
    return [loaded[f"hidden.{j}"] for j in range(len(loaded))]
