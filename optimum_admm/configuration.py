"""Pruning recipes: small validated dataclasses, one per method.

A config is the *recipe* of a pruning run (what to prune, how sparse, the method's knobs). It is strict on
construction (a bad value raises :class:`ValueError` naming the field, the value and what is allowed) and lenient on
load (:meth:`PruningConfig.from_dict` warns about keys written by a newer version and ignores them). Run-time options
such as devices or progress bars are never part of a recipe.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import InvalidArgumentError
from .version import __version__

UNSTRUCTURED = "unstructured"
#: The recipe's file name in a saved model or recipe directory (the pruning sidecar).
RECIPE_FILE = "pruning_config.json"
_NM_PATTERN = re.compile(r"^\s*(\S+)\s*:\s*(\S+)\s*$")

#: ``{method name: config class}``, filled by :func:`optimum_admm.registry.register_method` (one class per name).
_CONFIG_CLASSES: dict[str, type[PruningConfig]] = {}


def add_config_class(cls: type[PruningConfig]) -> None:
    """Make ``cls`` the class that loads recipes whose ``method`` is ``cls.method``; a name is taken only once.

    Called by :func:`optimum_admm.registry.register_method`, which owns the registration (this table lives here so
    that loading a recipe needs no import of the registry).
    """
    known = _CONFIG_CLASSES.get(cls.method)
    if known is not None and known is not cls:
        raise InvalidArgumentError(f"method {cls.method!r} belongs to {known.__qualname__} already")
    _CONFIG_CLASSES[cls.method] = cls


def config_classes() -> dict[str, type[PruningConfig]]:
    """``{method name: config class}``: the built-in methods' and every registered one's."""
    return dict(_CONFIG_CLASSES)


def default_of(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls``, read from the field (no instance is built).

    Example:
        >>> default_of(ADMMConfig, "targets")
        ['Linear', 'Conv1D']
    """
    for item in dataclasses.fields(cls):
        if item.name == name:
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
            return None if item.default is dataclasses.MISSING else item.default
    raise InvalidArgumentError(f"{cls.__name__} has no field {name!r}")


def parse_nm(mask_structure: str) -> tuple[int, int] | None:
    """Parse a mask structure string.

    Args:
        mask_structure: ``"unstructured"`` or ``"N:M"`` (keep ``N`` weights out of every ``M`` consecutive inputs).

    Returns:
        ``None`` for ``"unstructured"``, else the pair ``(N, M)``.

    Raises:
        ValueError: when the string is neither form, or ``N``/``M`` are not integers with ``0 < N < M``.

    Example:
        >>> parse_nm("2:4")
        (2, 4)
        >>> parse_nm("unstructured") is None
        True
    """
    if not isinstance(mask_structure, str):
        raise InvalidArgumentError(
            f"mask_structure must be a string, 'unstructured' or 'N:M' such as '2:4'; got {mask_structure!r}"
        )
    if mask_structure.strip().lower() == UNSTRUCTURED:
        return None
    match = _NM_PATTERN.match(mask_structure)
    allowed = "'unstructured' or 'N:M' with integers 0 < N < M, such as '2:4' or '4:8'"
    if match is None:
        raise InvalidArgumentError(f"mask_structure={mask_structure!r} is malformed; allowed: {allowed}")
    try:
        n, m = int(match.group(1)), int(match.group(2))
    except ValueError:
        raise InvalidArgumentError(
            f"mask_structure={mask_structure!r} has non-integer N or M; allowed: {allowed}"
        ) from None
    if not 0 < n < m:
        raise InvalidArgumentError(f"mask_structure={mask_structure!r} needs 0 < N < M; allowed: {allowed}")
    return n, m


def _check_type(name: str, value: Any, types: type | tuple[type, ...], allowed: str) -> None:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise InvalidArgumentError(f"{name}={value!r} is invalid; allowed: {allowed}")
    if not isinstance(value, types):
        raise InvalidArgumentError(f"{name}={value!r} is invalid; allowed: {allowed}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgumentError(f"{name}={value!r} is invalid; allowed: {allowed}, finite")


#: The routers of mixture-of-experts layers, in the default ``ignore``: modules named ``router``, ``gate`` or
#: ``shared_expert_gate`` and anything inside them (a plain ``nn.Linear`` in afmoe, dbrx, hunyuan or jetmoe; a
#: subclass or a bare parameter elsewhere). Dense feed-forward gates are named ``gate_proj`` and are not matched.
ROUTERS = r"re:(.*\.)?(router|gate|shared_expert_gate)(\..*)?"


@dataclass
class PruningConfig:
    """Fields shared by every pruning method.

    Subclasses add the method's own knobs and register an algorithm in :mod:`optimum_admm.registry`.

    Example:
        >>> from optimum_admm import ADMMConfig
        >>> ADMMConfig(sparsity=0.6).to_dict()["method"]
        'admm'
    """

    method: ClassVar[str] = "base"
    #: Whether the method reads calibration activations at all (magnitude does not).
    needs_calibration: ClassVar[bool] = True

    sparsity: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of weights set to zero in each pruned layer, in [0, 1). Defaults to 0.5, "
            "or 1 - N/M for an N:M mask_structure."
        },
    )
    mask_structure: str = field(
        default=UNSTRUCTURED, metadata={"help": "'unstructured' or 'N:M' (N kept in every M consecutive inputs)."}
    )
    num_samples: int = field(default=128, metadata={"help": "Number of calibration sequences."})
    sequence_length: int = field(default=2048, metadata={"help": "Tokens per calibration sequence."})
    calibration_batch_size: int = field(
        default=8,
        metadata={
            "help": "Calibration sequences run through each block at once (larger products: faster, more transient "
            "activation memory; results equal within float rounding). With several processes each runs one at a time."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for drawing the calibration windows."})
    targets: list[str] = field(
        default_factory=lambda: ["Linear", "Conv1D"],
        metadata={
            "help": "Modules to prune inside the decoder blocks: class names, module names (suffix match) or "
            "'re:<regex>' patterns on the full module name."
        },
    )
    ignore: list[str] = field(
        default_factory=lambda: ["lm_head", ROUTERS],
        metadata={
            "help": "Modules never pruned; same matching rules as targets. By default the LM head and the routers of "
            "mixture-of-experts layers (modules named router, gate or shared_expert_gate, whatever their class): "
            "pruning a router changes which experts every token reaches."
        },
    )
    calibrate_all_experts: bool = field(
        default=False,
        metadata={
            "help": "Calibrate every expert of a mixture-of-experts layer on every token, not only on the tokens "
            "the router sends it (outputs stay routed). Costs one expert forward per token and expert; helps "
            "experts that receive few tokens. An expert that receives none is calibrated on every token either way."
        },
    )
    true_sequential: bool = field(
        default=False,
        metadata={
            "help": "Prune the layers of a block group by group ([q,k,v] -> [o] -> [gate,up] -> [down]), "
            "recomputing inputs between groups."
        },
    )
    sparsity_map: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer sparsities, {pattern: sparsity} (same matching rules as targets, first match wins; "
            "unstructured masks only). The layers no pattern matches share the sparsity that keeps the model's "
            "total at `sparsity`."
        },
    )
    sparsity_profile: str = field(
        default="uniform",
        metadata={
            "help": "'uniform' (every layer at `sparsity`) or 'owl': outlier-weighted layerwise sparsity (Yin et al. "
            "2024), each decoder block's sparsity lowered by its share of outlier activations, the model's total "
            "kept at `sparsity` (unstructured masks only; one extra dense calibration forward)."
        },
    )
    owl_m: float = field(default=5.0, metadata={"help": "OWL: a score is an outlier above owl_m x its layer's mean."})
    owl_lambda: float = field(default=0.08, metadata={"help": "OWL: block sparsities span sparsity +- owl_lambda."})

    def __post_init__(self) -> None:
        nm = parse_nm(self.mask_structure)
        if nm is None:
            self.mask_structure = UNSTRUCTURED
            if self.sparsity is None:
                self.sparsity = 0.5
        else:
            self.mask_structure = f"{nm[0]}:{nm[1]}"
            implied = 1.0 - nm[0] / nm[1]
            if self.sparsity is None:
                self.sparsity = implied
            elif (
                not isinstance(self.sparsity, bool)
                and isinstance(self.sparsity, (int, float))
                and abs(float(self.sparsity) - implied) > 1e-9
            ):
                raise InvalidArgumentError(
                    f"sparsity={self.sparsity!r} contradicts mask_structure={self.mask_structure!r}, which "
                    f"implies sparsity {implied:g}; pass sparsity={implied:g} or leave sparsity unset"
                )
        _check_type("sparsity", self.sparsity, (int, float), "a number in [0, 1)")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise InvalidArgumentError(f"sparsity={self.sparsity!r} is out of range; allowed: a number in [0, 1)")
        self.sparsity = float(self.sparsity)
        _check_type("num_samples", self.num_samples, int, "an integer >= 1")
        if self.num_samples < 1:
            raise InvalidArgumentError(f"num_samples={self.num_samples!r} is invalid; allowed: an integer >= 1")
        _check_type("calibration_batch_size", self.calibration_batch_size, int, "an integer >= 1")
        if self.calibration_batch_size < 1:
            raise InvalidArgumentError(
                f"calibration_batch_size={self.calibration_batch_size!r} is invalid; allowed: an integer >= 1"
            )
        _check_type("sequence_length", self.sequence_length, int, "an integer >= 1")
        if self.sequence_length < 1:
            raise InvalidArgumentError(
                f"sequence_length={self.sequence_length!r} is invalid; allowed: an integer >= 1"
            )
        _check_type("seed", self.seed, int, "an integer")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise InvalidArgumentError(f"{name}={value!r} is invalid; allowed: a list of non-empty strings")
            for pattern in value:
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as err:
                        raise InvalidArgumentError(f"{name} pattern {pattern!r} is not a valid regex: {err}") from None
            if name == "targets" and not value:
                raise InvalidArgumentError("targets=[] is invalid; allowed: a non-empty list of patterns")
            setattr(self, name, list(value))
        _check_type("true_sequential", self.true_sequential, bool, "True or False")
        _check_type("calibrate_all_experts", self.calibrate_all_experts, bool, "True or False")
        self._check_non_uniform()

    def _check_non_uniform(self) -> None:
        if not isinstance(self.sparsity_map, dict) or not all(
            isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
            for k, v in self.sparsity_map.items()
        ):
            raise InvalidArgumentError(
                f"sparsity_map={self.sparsity_map!r} is invalid; allowed: a dict of pattern -> sparsity in [0, 1)"
            )
        self.sparsity_map = {k: float(v) for k, v in self.sparsity_map.items()}
        if self.sparsity_profile not in ("uniform", "owl"):
            raise InvalidArgumentError(
                f"sparsity_profile={self.sparsity_profile!r} is unknown; allowed: 'uniform', 'owl'"
            )
        if self.nm is not None and (self.sparsity_map or self.sparsity_profile != "uniform"):
            raise InvalidArgumentError(
                f"sparsity_map / sparsity_profile={self.sparsity_profile!r} with mask_structure="
                f"{self.mask_structure!r} is invalid: an N:M pattern fixes every layer's sparsity; allowed: "
                "mask_structure='unstructured'"
            )
        _check_type("owl_m", self.owl_m, (int, float), "a number > 0")
        _check_type("owl_lambda", self.owl_lambda, (int, float), "a number in [0, 0.5)")
        if self.owl_m <= 0 or not 0 <= self.owl_lambda < 0.5:
            raise InvalidArgumentError(
                f"owl_m={self.owl_m!r}, owl_lambda={self.owl_lambda!r} is invalid; allowed: owl_m > 0, "
                "0 <= owl_lambda < 0.5"
            )

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M mask structure, else ``None``."""
        return parse_nm(self.mask_structure)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-serialisable dict, stamped with the method and the library version."""
        data = {"method": self.method, **dataclasses.asdict(self), "optimum_admm_version": __version__}
        return data

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the recipe as ``pruning_config.json`` in ``save_directory`` (created if missing), as PEFT configs do.

        The file has the sidecar's layout (``method`` and ``config``), so :meth:`from_pretrained`,
        :func:`optimum_admm.export.load_pruning_config` and ``optimum-cli admm prune --recipe`` all read it.

        Example:
            >>> import tempfile
            >>> path = ADMMConfig(sparsity=0.6).save_pretrained(tempfile.mkdtemp())
            >>> PruningConfig.from_pretrained(path.parent).sparsity
            0.6
        """
        from .files import atomic_write

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"format_version": 1, "method": self.method, "config": self.to_dict()}
        text = json.dumps(payload, indent=2) + "\n"
        return atomic_write(directory / RECIPE_FILE, lambda path: path.write_text(text, encoding="utf-8"))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
    ) -> PruningConfig:
        """The recipe in ``pruning_config.json`` of a local directory or a Hub repo (a pruned model's sidecar or a
        saved recipe). Called on a subclass, only that method's recipes load.

        Example:
            >>> ADMMConfig.from_pretrained("me/smollm2-admm-60")  # doctest: +SKIP
            ADMMConfig(sparsity=0.6, ...)
        """
        from .hub_files import saved_file

        path = saved_file(name_or_path, RECIPE_FILE, revision=revision, token=token)
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls.from_dict(data.get("config", data) if isinstance(data, dict) else data)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Upload the recipe as ``pruning_config.json`` to ``repo_id`` (created if missing) in one commit.

        Example:
            >>> ADMMConfig(sparsity=0.6).push_to_hub("me/admm-recipes")  # doctest: +SKIP
        """
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="optimum-admm-recipe-") as scratch:
            path = self.save_pretrained(scratch)
            return api.upload_file(
                path_or_fileobj=str(path),
                path_in_repo=RECIPE_FILE,
                repo_id=repo_id,
                revision=revision,
                commit_message=commit_message or f"Upload {self.method} pruning recipe",
                create_pr=create_pr,
            )

    def to_json_file(self, path: str | Path) -> None:
        """Write :meth:`to_dict` to ``path`` as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> PruningConfig:
        """Rebuild a config; keys this version does not know are ignored with a warning (refused when ``strict``,
        as for a recipe file a user wrote, where an unknown key is a typo).

        Called on :class:`PruningConfig` itself, the ``method`` key picks the registered subclass; called on a
        subclass, only that class's own recipes load (a recipe of another method is refused).
        """
        data = dict(data)
        method = data.pop("method", None)
        data.pop("optimum_admm_version", None)
        target_cls = cls
        if cls is PruningConfig:
            classes = config_classes()
            if method not in classes:
                raise InvalidArgumentError(f"method={method!r} is unknown; allowed: {sorted(classes)}")
            target_cls = classes[method]
        elif method is not None and method != cls.method:
            raise InvalidArgumentError(
                f"method={method!r} is invalid for {cls.__name__}; allowed: {cls.method!r} (load other recipes "
                "with PruningConfig.from_dict)"
            )
        known = {f.name for f in dataclasses.fields(target_cls)}
        unknown = sorted(set(data) - known)
        if unknown and strict:
            raise InvalidArgumentError(
                f"{target_cls.__name__} has no field {', '.join(map(repr, unknown))}; allowed: {sorted(known)}"
            )
        if unknown:
            warnings.warn(
                f"Ignoring unknown {target_cls.__name__} keys {unknown} (written by a newer optimum-admm?)",
                stacklevel=2,
            )
        return target_cls(**{k: v for k, v in data.items() if k in known})


SCHEDULES = ("cubic", "constant")


@dataclass
class ADMMConfig(PruningConfig):
    """ADMM pruning with gradual mask selection (Boža 2024, https://arxiv.org/abs/2401.02938).

    For every linear layer, minimises ``||X W - X W0||^2`` under the sparsity mask with ADMM, re-selecting the mask
    during the first ``mask_iterations`` iterations as the target sparsity ramps up.

    Example:
        >>> from optimum_admm import ADMMConfig
        >>> config = ADMMConfig(sparsity=0.6)
        >>> config.iterations, config.schedule
        (20, 'cubic')
        >>> ADMMConfig(mask_structure="2:4").sparsity
        0.5
    """

    method: ClassVar[str] = "admm"

    schedule: str = field(
        default="cubic",
        metadata={
            "help": "'cubic': sparsity ramps s - s(1-(t+1)/T)^3 over the mask steps (the paper); 'constant': "
            "every mask step selects at the final sparsity (what the reference code runs for unstructured masks)."
        },
    )
    iterations: int = field(default=20, metadata={"help": "ADMM iterations per layer."})
    mask_iterations: int = field(default=15, metadata={"help": "Iterations during which the mask is re-selected."})
    rho: float = field(default=1.0, metadata={"help": "ADMM penalty parameter."})
    dampening: float = field(
        default=0.1, metadata={"help": "Damping toward the dense weights, as a fraction of the mean Gram diagonal."}
    )
    per_output: bool = field(
        default=False, metadata={"help": "Select unstructured masks per output row instead of per layer."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            raise InvalidArgumentError(
                f"schedule={self.schedule!r} is unknown; allowed: {', '.join(map(repr, SCHEDULES))}"
            )
        _check_type("iterations", self.iterations, int, "an integer >= 1")
        if self.iterations < 1:
            raise InvalidArgumentError(f"iterations={self.iterations!r} is invalid; allowed: an integer >= 1")
        _check_type("mask_iterations", self.mask_iterations, int, f"an integer in [1, iterations={self.iterations}]")
        if not 1 <= self.mask_iterations <= self.iterations:
            raise InvalidArgumentError(
                f"mask_iterations={self.mask_iterations!r} is invalid; allowed: an integer in "
                f"[1, iterations={self.iterations}]"
            )
        _check_type("rho", self.rho, (int, float), "a number > 0")
        if not self.rho > 0:
            raise InvalidArgumentError(f"rho={self.rho!r} is invalid; allowed: a number > 0")
        self.rho = float(self.rho)
        _check_type("dampening", self.dampening, (int, float), "a number >= 0")
        if not self.dampening >= 0:
            raise InvalidArgumentError(f"dampening={self.dampening!r} is invalid; allowed: a number >= 0")
        self.dampening = float(self.dampening)
        _check_type("per_output", self.per_output, bool, "True or False")

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> ADMMConfig:
        """An ADMM config from a measured time-quality preset (:data:`ADMM_PRESETS`), with ``overrides`` on top.

        ``"paper"`` is the default (20 iterations, mask chosen over the first 15); ``"fast"`` (4/3) and
        ``"balanced"`` (10/8) trade quality for time. On SmolLM2-135M on 2 CPU cores, ``"fast"`` beat SparseGPT in
        both perplexity and wall time at 60% and at 2:4 (``benchmarks/results/frontier-smollm2-135m.md``).

        Example:
            >>> config = ADMMConfig.from_preset("fast", sparsity=0.6)
            >>> config.iterations, config.mask_iterations, config.sparsity
            (4, 3, 0.6)
        """
        if preset not in ADMM_PRESETS:
            raise InvalidArgumentError(f"preset={preset!r} is unknown; allowed: {', '.join(map(repr, ADMM_PRESETS))}")
        return cls(**{**ADMM_PRESETS[preset], **overrides})


#: ADMM's time-quality presets (iterations / mask iterations), from ``benchmarks/frontier.py``.
ADMM_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"iterations": 20, "mask_iterations": 15},
    "balanced": {"iterations": 10, "mask_iterations": 8},
    "fast": {"iterations": 4, "mask_iterations": 3},
}


@dataclass
class SparseGPTConfig(PruningConfig):
    """SparseGPT (Frantar & Alistarh 2023, https://arxiv.org/abs/2301.00774): OBS column sweep with lazy batch updates.

    Example:
        >>> from optimum_admm import SparseGPTConfig
        >>> SparseGPTConfig(sparsity=0.6).block_size
        128
    """

    method: ClassVar[str] = "sparsegpt"

    block_size: int = field(default=128, metadata={"help": "Columns per lazy batch update (and per mask choice)."})
    dampening: float = field(default=0.01, metadata={"help": "Damping, as a fraction of the mean Hessian diagonal."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_type("block_size", self.block_size, int, "an integer >= 1")
        if self.block_size < 1:
            raise InvalidArgumentError(f"block_size={self.block_size!r} is invalid; allowed: an integer >= 1")
        if self.nm is not None and self.block_size % self.nm[1]:
            raise InvalidArgumentError(
                f"block_size={self.block_size!r} is invalid for mask_structure={self.mask_structure!r}; allowed: a "
                f"multiple of M={self.nm[1]}"
            )
        _check_type("dampening", self.dampening, (int, float), "a number > 0")
        if not self.dampening > 0:
            raise InvalidArgumentError(f"dampening={self.dampening!r} is invalid; allowed: a number > 0")
        self.dampening = float(self.dampening)


@dataclass
class WandaConfig(PruningConfig):
    """Wanda (Sun et al. 2023, https://arxiv.org/abs/2306.11695): prune by ``|W_ij| * ||X_j||``, no weight update.

    Example:
        >>> from optimum_admm import WandaConfig
        >>> WandaConfig(mask_structure="2:4").per_output
        True
    """

    method: ClassVar[str] = "wanda"

    per_output: bool = field(default=True, metadata={"help": "Select per output row (the paper) or per layer."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_type("per_output", self.per_output, bool, "True or False")


@dataclass
class MagnitudeConfig(PruningConfig):
    """Magnitude pruning: zero the smallest ``|W|``. Reads no calibration data.

    Example:
        >>> from optimum_admm import MagnitudeConfig
        >>> MagnitudeConfig(sparsity=0.5).needs_calibration
        False
    """

    method: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False

    per_output: bool = field(default=False, metadata={"help": "Select per output row instead of per layer."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_type("per_output", self.per_output, bool, "True or False")


# The built-in recipes load without the registry (which registers their methods under the same names).
for _cls in (ADMMConfig, SparseGPTConfig, WandaConfig, MagnitudeConfig):
    add_config_class(_cls)
