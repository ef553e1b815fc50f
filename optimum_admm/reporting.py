"""What a pruning run did, layer by layer."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerReport", "PhaseTimer", "PruningReport"]


class PhaseTimer:
    """Wall time per phase, exclusive: a phase nested in another is not counted in the outer one as well.

    So the phases of a run add up to its wall time (with ``other`` for what no phase covered), however the work
    nests: a block read from disk inside a forward is load time, not forward time.

    Example:
        >>> timer = PhaseTimer()
        >>> with timer.phase("forward"):
        ...     with timer.phase("load"):
        ...         time.sleep(0.01)
        >>> timer.seconds["load"] >= 0.01 > timer.seconds["forward"]
        True
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._nested: list[float] = []  # per open phase: the time its nested phases took
        self._started = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the ``with`` body's wall time, less that of the phases nested in it, under ``name``."""
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            nested = self._nested.pop()
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed - nested
            if self._nested:
                self._nested[-1] += elapsed

    @property
    def wall(self) -> float:
        """Seconds since the timer was made."""
        return time.perf_counter() - self._started


@dataclass
class LayerReport:
    """One pruned layer.

    Attributes:
        name: full module name.
        shape: ``(out_features, in_features)``.
        sparsity: achieved fraction of exact zeros.
        relative_error: ``||X(W - W0)^T||^2 / ||X W0^T||^2`` on the calibration inputs (``None`` without them).
        seconds: wall time of the solve for this layer.
        num_tokens: calibration tokens seen by the layer.

    Example:
        >>> layer = LayerReport("model.layers.0.mlp.up_proj", (128, 64), 0.5, 0.012, 0.03)
        >>> layer.sparsity, layer.relative_error
        (0.5, 0.012)
    """

    name: str
    shape: tuple[int, int]
    sparsity: float
    relative_error: float | None
    seconds: float
    num_tokens: int = 0


@dataclass
class PruningReport:
    """Per-layer results and timings of one pruning run.

    Example:
        >>> report = PruningReport(method="admm", config={}, layers=[LayerReport("a", (2, 2), 0.5, 0.01, 0.1)])
        >>> report.sparsity, report.mean_relative_error
        (0.5, 0.01)
    """

    method: str
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    forward_seconds: float = 0.0
    statistics_seconds: float = 0.0
    solve_seconds: float = 0.0
    total_seconds: float = 0.0
    #: Reading weights (streaming and offload) and writing the output and checkpoints.
    load_seconds: float = 0.0
    write_seconds: float = 0.0
    #: With several processes: all-reducing statistics, broadcasting pruned weights, gathering checkpoint inputs.
    communication_seconds: float = 0.0
    #: Targeted layers left dense, and why (for example: no calibration input, the weight is read functionally).
    left_dense: dict[str, str] = field(default_factory=dict)
    #: Expert matrices calibrated on every token because the router sent them none (the policy for unrouted experts).
    expert_fallbacks: dict[str, str] = field(default_factory=dict)
    #: Every parameter of the model by kind (``attention``, ``mlp``, ``experts``, ``other`` inside the decoder
    #: blocks, ``outside blocks``: embeddings, final norm, head): ``{kind: {"total": n, "zeros": pruned}}``.
    parameters: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def model_fraction_pruned(self) -> float | None:
        """The fraction of all the model's parameters this run set to zero (``None`` when not counted).

        Example:
            >>> PruningReport("admm", {}, parameters={"mlp": {"total": 80, "zeros": 40},
            ...                                       "outside blocks": {"total": 20, "zeros": 0}}).model_fraction_pruned
            0.4
        """
        total = sum(entry["total"] for entry in self.parameters.values())
        return None if not total else sum(entry["zeros"] for entry in self.parameters.values()) / total

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over every pruned layer, weighted by size."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0

    @property
    def mean_relative_error(self) -> float | None:
        """Mean of the per-layer relative reconstruction errors (``None`` if none was measured)."""
        errors = [r.relative_error for r in self.layers if r.relative_error is not None]
        return sum(errors) / len(errors) if errors else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (with the aggregate sparsity and error)."""
        data = dataclasses.asdict(self)
        data["sparsity"] = self.sparsity
        data["mean_relative_error"] = self.mean_relative_error
        return data

    def to_json(self, indent: int = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self, max_rows: int | None = None) -> str:
        """A plain-text table of the layers and the totals."""
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        width = max([len(r.name) for r in rows] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>12}  {'sparsity':>8}  {'rel. error':>10}  {'seconds':>7}"]
        for r in rows:
            err = "n/a" if r.relative_error is None else f"{r.relative_error:.3e}"
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(f"{r.name:<{width}}  {shape:>12}  {r.sparsity:>8.4f}  {err:>10}  {r.seconds:>7.3f}")
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers")
        mean = self.mean_relative_error
        mean_text = "n/a" if mean is None or math.isnan(mean) else f"{mean:.3e}"
        lines.append(
            f"{self.method}: {len(self.layers)} layers, sparsity {self.sparsity:.4f}, mean relative error "
            f"{mean_text}, {self.total_seconds:.1f}s (forward {self.forward_seconds:.1f}s, statistics "
            f"{self.statistics_seconds:.1f}s, solve {self.solve_seconds:.1f}s)"
        )
        fraction = self.model_fraction_pruned
        if fraction is not None:  # the honest total: of every parameter, not only of the pruned layers
            kinds = ", ".join(
                f"{kind} {entry['zeros'] / entry['total']:.1%}"
                for kind, entry in self.parameters.items()
                if entry["total"]
            )
            total = sum(entry["total"] for entry in self.parameters.values())
            lines.append(f"zeroed {fraction:.1%} of all {total:,} parameters of the model ({kinds})")
        for name, reason in list(self.left_dense.items())[:5]:
            lines.append(f"left dense: {name}: {reason}")
        if self.expert_fallbacks:
            names = list(self.expert_fallbacks)
            more = f", ... {len(names) - 5} more" if len(names) > 5 else ""
            lines.append(
                f"{len(names)} expert matrices received no routed token and were calibrated on every token: "
                f"{', '.join(names[:5])}{more}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
